"""``hepsub-apiban health``, the container's health check: it asks the agent on the port the
configuration gives, as ``serve`` reads it, instead of a hard-coded 127.0.0.1:18088."""

from __future__ import annotations

from pathlib import Path

from .conftest import ApibanPeer, agent_env
from .test_cli import free_port, get_json, run, running


async def test_health_asks_the_agent_where_the_configuration_puts_it(
    tmp_path: Path, apiban: ApibanPeer
) -> None:
    port = free_port()
    config = tmp_path / "agent.toml"
    config.write_text(f'[agent]\nbind = "127.0.0.1"\nport = {port}\n')
    env = agent_env(tmp_path, apiban)
    url = f"http://127.0.0.1:{port}/healthz"

    down = await run(["health", "--config", str(config)], env, tmp_path)
    assert down.code == 1
    assert down.stderr.startswith(f"hepsub-apiban: no answer from {url}: "), down.stderr
    assert len(down.stderr.splitlines()) == 1

    async with running(["serve", "--config", str(config)], env, tmp_path) as child:
        await child.until(lambda: get_json(url), within=5.0)
        up = await run(["health", "--config", str(config)], env, tmp_path)
        assert (up.code, up.stdout, up.stderr) == (0, "", "")
        # The environment wins over the file, for health as for serve.
        elsewhere = free_port()
        moved = await run(
            ["health", "--config", str(config)], {**env, "HEPSUB_AGENT_PORT": str(elsewhere)}, tmp_path
        )
        assert moved.code == 1
        assert f"http://127.0.0.1:{elsewhere}/healthz" in moved.stderr
        await child.stop()


async def test_health_with_a_bad_configuration_is_unhealthy_not_docker_reserved_2(tmp_path: Path) -> None:
    result = await run(["health", "--config", str(tmp_path / "missing.toml")], {}, tmp_path)
    assert result.code == 1  # Docker reserves a health check's exit status 2
    assert result.stderr.startswith("hepsub-apiban: "), result.stderr
