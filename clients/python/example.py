import agentrun

client = agentrun.Client.from_env()  # AGENTRUN_MANAGER_URL, AGENTRUN_API_KEY, like the CLI
run = client.create_run("scripted", {"prompt": "[approval] deploy the site"})
for event in client.watch_run(run.run_id, deadline=120):  # resumes by itself if cut
    print(event.seq, event.type, event.payload)
    if event.type == "request.opened":
        client.resolve(run.run_id, event.payload["request_id"], "accept")
run = client.get_run(run.run_id)
print("run", run.run_id, agentrun.RunStatus.Name(run.status))
raise SystemExit(run.status != agentrun.RunStatus.Value("RUN_STATUS_COMPLETED"))
