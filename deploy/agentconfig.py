"""The agent.yaml a device receives: rendered from the merged layers and validated before it leaves."""

from __future__ import annotations

from typing import Any

import yaml

from reflexarc.config import ConfigError, Problem


def agent_yaml(agent: dict[str, Any]) -> str:
    """The agent configuration as the YAML text put into the container."""
    return "# written by reflexarc deploy; edit the fleet file instead\n" + yaml.safe_dump(
        agent, sort_keys=True, default_flow_style=False
    )


def render_agent_config(agent: dict[str, Any], source: str) -> Any:
    """Validate ``agent`` exactly as the edge agent will; return its ``AgentConfig``.

    The edge agent's own parser is used (sources checked against their
    plugins), so a configuration the agent would refuse never reaches a
    device. Line numbers of the rendered text mean nothing to the user, so
    problems keep only the field.
    """
    from reflexarc.deploy.fleet import CONFIG_DIR
    from reflexarc.edge.config import parse_agent_config

    try:
        cfg = parse_agent_config(agent_yaml(agent), source, base_dir=CONFIG_DIR)
    except ConfigError as exc:
        raise ConfigError([Problem(source, None, None, p.field, p.message) for p in exc.problems]) from None
    # Pin what would otherwise default from the deployer's environment, so the
    # container runs what the plan showed and the deployer knows its topics.
    agent.setdefault("namespace", cfg.namespace)
    agent.setdefault("site", cfg.site)
    return cfg
