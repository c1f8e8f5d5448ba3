// The login box: paste an API key and optionally an admin key (kept in sessionStorage for
// this tab), or none against `agentrun dev` without --auth. Shown instead of the page when
// the server refuses a key.
import { useState } from "preact/hooks";

import { adminKey, apiKey, setApiKeys } from "../api";

export function Login({ error, onDone }: { error: string | null; onDone: () => void }) {
  const [key, setKey] = useState(apiKey());
  const [admin, setAdmin] = useState(adminKey());
  const save = (e: Event) => {
    e.preventDefault();
    setApiKeys(key.trim(), admin.trim());
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
        Paste a client API key (<code>ark_…</code>) for runs, approvals and sessions, and an admin key for runners,
        queues and live counts. They are kept in this tab's session storage and sent as{" "}
        <code>authorization: Bearer …</code>. Leave both empty against a manager without authentication.
      </p>
      <label>
        API key (client)
        <input
          name="api-key"
          type="password"
          autocomplete="off"
          placeholder="ark_…"
          value={key}
          onInput={(e) => setKey(e.currentTarget.value)}
        />
      </label>
      <label>
        admin key (optional)
        <input
          name="admin-key"
          type="password"
          autocomplete="off"
          placeholder="ark_…"
          value={admin}
          onInput={(e) => setAdmin(e.currentTarget.value)}
        />
      </label>
      <div class="row">
        <button type="submit">Use this key</button>
        <button
          type="button"
          onClick={() => {
            setKey("");
            setAdmin("");
            setApiKeys("", "");
            onDone();
          }}
        >
          No key
        </button>
      </div>
    </form>
  );
}
