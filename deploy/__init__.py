"""Deploy edge agents to a fleet of devices as containers, through the Docker Engine API.

``fleet`` (the fleet file), ``planner`` (plan), ``rollout`` (apply),
``health``, ``containers`` (layout on an engine), ``image`` (the agent
image), ``cli`` (``reflexarc deploy ...``). See docs/deploy.md.
"""
