"""resilient-moe-chaos: scripted faults against a live resilient-moe server, with a measured recovery report.

    scenario.py   the scenario file: workload, fault timeline, assertions (validated before anything runs)
    targets.py    the admin API client and how a fault's target names workers
    injectors.py  process faults (signals, a CPU hog) and datapath faults (through the admin API)
    workload.py   the HTTP load generator that records every token's arrival
    report.py     stall, loss, correctness and recovery per fault; report.json, report.md, timeline.png
    runner.py     one scenario run: load + faults, failure-free replay, report, verdict
    cli.py        the `resilient-moe-chaos` command
"""
