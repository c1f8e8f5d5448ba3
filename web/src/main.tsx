// The operator UI's shell: the navigation, the login box, and the page for the route.
import { render } from "preact";
import { useEffect, useState } from "preact/hooks";

import { apiKey, authError, onAuthChange } from "./api";
import { Login } from "./pages/Login";
import { Approvals } from "./pages/Approvals";
import { Queues } from "./pages/Queues";
import { RunPage } from "./pages/Run";
import { Runners } from "./pages/Runners";
import { Runs } from "./pages/Runs";
import { Sessions } from "./pages/Sessions";
import { href, useRoute } from "./router";

const NAV: [string, string][] = [
  ["runs", "Runs"],
  ["approvals", "Approvals"],
  ["sessions", "Sessions"],
  ["runners", "Runners"],
  ["queues", "Queues"],
];

function App() {
  const route = useRoute();
  const [, setAuthVersion] = useState(0);
  const [showLogin, setShowLogin] = useState(false);
  useEffect(() => onAuthChange(() => setAuthVersion((v) => v + 1)), []);

  const refused = authError();
  const section = route.parts[0] ?? "runs";
  let page;
  if (refused !== null || showLogin) {
    page = <Login error={refused} onDone={() => setShowLogin(false)} />;
  } else if (section === "runs" && route.parts[1]) {
    page = <RunPage key={route.parts[1]} runId={route.parts[1]} query={route.query} />;
  } else if (section === "approvals") {
    page = <Approvals />;
  } else if (section === "sessions") {
    page = <Sessions query={route.query} />;
  } else if (section === "runners") {
    page = <Runners />;
  } else if (section === "queues") {
    page = <Queues />;
  } else {
    page = <Runs query={route.query} />;
  }
  return (
    <>
      <header class="top">
        <a class="brand" href={href(["runs"])}>
          agentrun
        </a>
        <nav>
          {NAV.map(([name, label]) => (
            <a key={name} href={href([name])} class={section === name ? "active" : ""}>
              {label}
            </a>
          ))}
        </nav>
        <button class="link key-button" onClick={() => setShowLogin(true)}>
          {apiKey() ? "API key ✓" : "API key"}
        </button>
      </header>
      <main>{page}</main>
    </>
  );
}

render(<App />, document.getElementById("app")!);
