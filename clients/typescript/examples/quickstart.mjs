import { Client, RunStatus } from "@agentrun/client";

const client = Client.fromEnv(); // AGENTRUN_MANAGER_URL, AGENTRUN_API_KEY, like the CLI
const run = await client.createRun("scripted", { prompt: "[approval] deploy the site" });
for await (const event of client.watchRun(run.runId, { deadlineMs: 120_000 })) { // resumes if cut
  console.log(event.seq, event.type, event.payload);
  if (event.type === "request.opened") await client.resolve(run.runId, event.payload.request_id, "accept");
}
const final = await client.getRun(run.runId);
console.log("run", final.runId, RunStatus[final.status]);
process.exit(final.status === RunStatus.COMPLETED ? 0 : 1);
