"""The model and everything that trains, evaluates and samples it. Never imports Prefect."""
