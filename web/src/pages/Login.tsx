// The login box: paste an API key (kept in sessionStorage for this tab), or none against
// `agentrun dev` without --auth. Shown instead of the page when the server refuses the key.
import { useState } from "preact/hooks";

import { apiKey, setApiKey } from "../api";

export function Login({ error, onDone }: { error: string | null; onDone: () => void }) {
  const [key, setKey] = useState(apiKey());
  const save = (e: Event) => {
    e.preventDefault();
    setApiKey(key.trim());
    onDone();
  };
  return (
    <form class="login card" onSubmit={save}>
      <h2>API key</h2>
      {error !== null && (
        <p class="error" role="alert">
          the API key was refused: {error}
        </p>
      )}
      <p class="muted">
        Paste an API key (<code>ark_…</code>). It is kept in this tab's session storage and sent as{" "}
        <code>authorization: Bearer …</code>. Leave it empty against a manager without authentication.
      </p>
      <input
        name="api-key"
        type="password"
        autocomplete="off"
        placeholder="ark_…"
        value={key}
        onInput={(e) => setKey(e.currentTarget.value)}
      />
      <div class="row">
        <button type="submit">Use this key</button>
        <button
          type="button"
          onClick={() => {
            setKey("");
            setApiKey("");
            onDone();
          }}
        >
          No key
        </button>
      </div>
    </form>
  );
}
