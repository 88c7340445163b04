"""``docker/``: the compose file against the Compose Specification's own JSON schema
(tests/data/compose, see its NOTICE) and what the deployment relies on; the Dockerfile read
instruction by instruction; the image's health check (docker/healthcheck.py) against the
worker's real SIP core, in memory."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest
import yaml

from tests.sip_pair import settings_for
from worker.asterisk_config import TEMPLATES, render
from worker.config import Settings, load_settings
from worker.front.front import KILL_AFTER_S, SHUTDOWN_EXTRA_S
from worker.sip.core import UserAgentCore
from worker.sip.message import SipRequest, parse
from worker.sip.transaction import Transport

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
SCHEMA = ROOT / "tests" / "data" / "compose" / "compose-spec.json"


@pytest.fixture(autouse=True)
def _no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("AISPINNER_"):
            monkeypatch.delenv(name)


def compose() -> dict[str, Any]:
    loaded = yaml.safe_load((DOCKER / "compose.yml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def schema_errors(document: object) -> list[str]:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft201909Validator.check_schema(schema)
    validator = jsonschema.Draft201909Validator(schema)
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(document)
    ]


# -- compose.yml ----------------------------------------------------------------------------------


class TestComposeSpecification:
    def test_compose_file_is_valid(self) -> None:
        assert schema_errors(compose()) == []

    @pytest.mark.parametrize(
        "breakage",
        [
            lambda d: d["services"]["worker"].update(restart_policy="always"),
            lambda d: d["services"]["asterisk"]["healthcheck"].update(interval=15),
            lambda d: d["services"]["asterisk"]["volumes"][0].update(read_only="yes"),
        ],
    )
    def test_the_schema_rejects_a_broken_file(self, breakage: Any) -> None:
        """The check above can fail: the same file, broken in one place, is refused."""
        document = compose()
        breakage(document)
        assert schema_errors(document) != []


class TestComposeServices:
    def test_asterisk_and_the_worker_on_host_networking_restarting(self) -> None:
        services = compose()["services"]
        assert set(services) == {"asterisk", "worker"}
        for service in services.values():
            assert service["network_mode"] == "host"
            assert service["restart"] in ("always", "unless-stopped", "on-failure")

    def test_postgresql_is_left_for_later(self) -> None:
        text = (DOCKER / "compose.yml").read_text()
        assert "PostgreSQL" in text
        assert not any("postgres" in name for name in compose()["services"])

    def test_asterisk_image_is_22_pinned_by_a_tag(self) -> None:
        image = compose()["services"]["asterisk"]["image"]
        name, _, tag = image.partition(":")
        assert name == "andrius/asterisk"
        assert tag.startswith("22.")
        assert re.fullmatch(r"22\.\d+\.\d+_debian-[a-z]+", tag), tag

    def test_the_rendered_files_are_mounted_into_etc_asterisk(self) -> None:
        volumes = compose()["services"]["asterisk"]["volumes"]
        mounted = {(v["source"], v["target"]) for v in volumes}
        assert mounted == {(f"./asterisk/{n}", f"/etc/asterisk/{n}") for n in TEMPLATES}
        for volume in volumes:
            assert volume["type"] == "bind"
            assert volume["read_only"] is True
            assert volume["bind"]["create_host_path"] is False

    def test_healthchecks_and_start_order(self) -> None:
        services = compose()["services"]
        for name, service in services.items():
            check = service["healthcheck"]
            assert check["test"][0] in ("CMD", "CMD-SHELL"), name
            assert check["retries"] >= 1
        asterisk_test = services["asterisk"]["healthcheck"]["test"][1]
        assert "http show status" in asterisk_test
        assert "ari show status" in asterisk_test
        assert services["worker"]["depends_on"]["asterisk"]["condition"] == "service_healthy"
        worker_test = services["worker"]["healthcheck"]["test"]
        assert worker_test[-1] in copied_into_final_stage()

    def test_the_unprivileged_worker_may_take_its_real_time_priority(self) -> None:
        """The image's user is not root: RLIMIT_RTPRIO is what grants its media processes
        SCHED_RR at ``realtime_priority``."""
        limit = compose()["services"]["worker"]["ulimits"]["rtprio"]
        settings = load_settings(DOCKER / "worker.example.toml")
        assert limit >= settings.realtime_priority > 0

    def test_docker_waits_for_the_drain_before_it_kills(self) -> None:
        """``docker compose stop`` sends SIGTERM, then SIGKILL after ``stop_grace_period``
        (10 s by default): long enough for the drain and the flush after it."""
        period = compose()["services"]["worker"]["stop_grace_period"]
        assert period.endswith("s")
        drain = Settings().drain_grace_s + SHUTDOWN_EXTRA_S + KILL_AFTER_S
        assert float(period[:-1]) > drain

    def test_worker_settings_point_at_asterisk_through_ari(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The worker's environment with the example worker.toml: valid settings, ingress "ari",
        and the Asterisk files rendered from them fit the mounts and the ARI URL."""
        worker = compose()["services"]["worker"]
        environment = worker["environment"]
        assert json.loads(environment["AISPINNER_INGRESS"]) == ["ari"]
        targets = {v["target"] for v in worker["volumes"]}
        assert environment["AISPINNER_CONFIG"] in targets
        for name, value in environment.items():
            if name != "AISPINNER_CONFIG":
                monkeypatch.setenv(name, value)
        settings = load_settings(DOCKER / "worker.example.toml")
        assert settings.ingress == ["ari"]
        files = render(settings)
        assert sorted(files) == sorted(
            Path(v["source"]).name for v in compose()["services"]["asterisk"]["volumes"]
        )
        assert f"bindport = {settings.ari.url.rsplit(':', 1)[1]}" in files["http.conf"]
        assert any(
            v["type"] == "volume" and v["target"] == "/var/lib/aispinner" for v in worker["volumes"]
        )


# -- Dockerfile -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int

    def flags(self) -> dict[str, str]:
        """Leading ``--name=value`` options (``COPY --from=builder``, ``RUN --mount=...``)."""
        out: dict[str, str] = {}
        for token in self.args.split():
            if not token.startswith("--"):
                break
            name, _, value = token[2:].partition("=")
            out[name] = value
        return out

    def operands(self) -> list[str]:
        """The arguments after the flags: JSON form or whitespace separated."""
        rest = self.args
        while rest.startswith("--"):
            rest = rest.split(None, 1)[1] if " " in rest else ""
        if rest.startswith("["):
            loaded = json.loads(rest)
            assert isinstance(loaded, list)
            return [str(x) for x in loaded]
        return rest.split()


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with their continuation lines joined; comments and blank lines dropped."""
    out: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        keyword, _, args = " ".join(p for p in pending if p).partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
        pending = []
    assert not pending, "the Dockerfile ends inside a continued instruction"
    return out


def stages() -> list[list[Instruction]]:
    out: list[list[Instruction]] = []
    for instruction in parse_dockerfile((DOCKER / "Dockerfile").read_text()):
        if instruction.keyword == "FROM":
            out.append([])
        assert out, f"{instruction.keyword} before the first FROM"
        out[-1].append(instruction)
    return out


def copied_into_final_stage() -> set[str]:
    return {i.operands()[-1] for i in stages()[-1] if i.keyword == "COPY"}


class TestDockerfileParser:
    def test_continuations_flags_and_json_form(self) -> None:
        text = (
            "# c\nFROM a:1 AS b\n"
            "RUN --mount=type=bind,from=b \\\n    # inner\n    echo x\n"
            'CMD ["run"]\n'
        )
        from_, run, cmd = parse_dockerfile(text)
        assert (from_.keyword, from_.operands()) == ("FROM", ["a:1", "AS", "b"])
        assert run.flags() == {"mount": "type=bind,from=b"}
        assert run.operands() == ["echo", "x"]
        assert cmd.operands() == ["run"]

    def test_an_unfinished_instruction_is_an_error(self) -> None:
        with pytest.raises(AssertionError):
            parse_dockerfile("RUN a \\\n")


class TestDockerfile:
    def test_multi_stage_from_pinned_images(self) -> None:
        froms = [stage[0].operands() for stage in stages()]
        assert len(froms) >= 2
        names = []
        for image, as_, name in froms:
            assert as_.upper() == "AS"
            _, _, tag = image.partition(":")
            assert tag, image
            assert tag != "latest", image
            assert "slim" in tag, image
            names.append(name)
        assert len(set(names)) == len(names)

    def test_runtime_takes_only_the_builders_wheels(self) -> None:
        builder, runtime = stages()[0], stages()[-1]
        builder_name = builder[0].operands()[2]
        assert any(i.keyword == "RUN" and "pip wheel" in i.args for i in builder)
        uses = [
            i
            for i in runtime
            if f"from={builder_name}" in i.flags().get("mount", "")
            or i.flags().get("from") == builder_name
        ]
        assert uses, "the runtime stage never takes anything from the builder"
        assert all("--no-index" in i.args for i in uses if i.keyword == "RUN")

    def test_runs_as_a_user_that_is_not_root(self) -> None:
        runtime = stages()[-1]
        users = [i for i in runtime if i.keyword == "USER"]
        assert users
        user = users[-1].operands()[0].split(":")[0]
        assert user not in ("root", "0")
        after = runtime[runtime.index(users[-1]) :]
        assert not any(i.keyword == "RUN" and "apt-get" in i.args for i in after)
        created = [i for i in runtime if i.keyword == "RUN" and "useradd" in i.args]
        assert created
        assert created[0].operands()[-1] == user

    def test_healthcheck_runs_the_copied_script(self) -> None:
        runtime = stages()[-1]
        (check,) = [i for i in runtime if i.keyword == "HEALTHCHECK"]
        options, _, command = check.args.partition("CMD")
        assert "--interval=" in options
        assert json.loads(command.strip())[-1] in copied_into_final_stage()

    def test_copy_sources_exist_and_are_in_the_build_context(self) -> None:
        text = (DOCKER / "Dockerfile.dockerignore").read_text()
        lines = [line.strip() for line in text.splitlines()]
        ignore = [line for line in lines if line and not line.startswith("#")]
        assert ignore[0] == "*"  # allow-list: only what is named below is sent
        allowed = [line[1:] for line in ignore if line.startswith("!")]
        copies = [
            i
            for stage in stages()
            for i in stage
            if i.keyword == "COPY" and "from" not in i.flags()
        ]
        assert copies
        for copy in copies:
            for source in copy.operands()[:-1]:
                assert (ROOT / source).exists(), source
                assert any(source == a or source.startswith(a + "/") for a in allowed), source

    def test_entrypoint_and_exposed_sip_port(self) -> None:
        runtime = stages()[-1]
        (entrypoint,) = [i for i in runtime if i.keyword == "ENTRYPOINT"]
        scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
        assert entrypoint.operands() == ["aispinner-worker"]
        assert "aispinner-worker" in scripts
        exposed = {p for i in runtime if i.keyword == "EXPOSE" for p in i.operands()}
        assert {"5060/udp", "5060/tcp"} <= exposed


# -- docker/healthcheck.py -------------------------------------------------------------------------


def healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "aispinner_healthcheck", DOCKER / "healthcheck.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ESTABLISHED_TO_8088 = (
    "  sl local_address rem_address st tx_queue rx_queue tr tm->when retrnsmt uid timeout inode\n"
    "   0: 0100007F:1F98 00000000:0000 0A 00000000:00000000 00:00000000 00000000 100 0 111 1\n"
    "   1: 0100007F:C350 0100007F:1F98 01 00000000:00000000 00:00000000 00000000 10001 0 777 1\n"
)


class TestHealthcheck:
    def test_the_workers_sip_core_answers_its_options(self, tmp_path: Path) -> None:
        check = healthcheck()
        core = UserAgentCore(settings_for(tmp_path, "b"))  # 127.0.0.2:5070, defaults otherwise
        data = check.options_request("127.0.0.2", 5070, "udp", ("127.0.0.1", 40000), "hc-1@x")
        request = parse(data)
        assert isinstance(request, SipRequest)
        assert request.method == "OPTIONS"
        core.receive(request, ("127.0.0.1", 40000), Transport.UDP, 1000.0)
        (out,) = core.data_to_send()
        assert out.destination == ("127.0.0.1", 40000)
        assert out.data.startswith(b"SIP/2.0 200 ")
        assert check.is_answer(out.data, "hc-1@x")
        assert not check.is_answer(out.data, "another@x")
        assert not check.is_answer(data, "hc-1@x")  # a request is no answer

    def test_ipv6_request_parses(self) -> None:
        data = healthcheck().options_request("::1", 5060, "tcp", ("::1", 40000), "c@x")
        assert parse(data).headers["Via"].startswith("SIP/2.0/TCP [::1]:40000;")

    @pytest.mark.parametrize(
        ("host", "probe"),
        [("0.0.0.0", "127.0.0.1"), ("::", "::1"), ("10.0.0.7", "10.0.0.7"), ("pbx", "pbx")],
    )
    def test_probe_host(self, host: str, probe: str) -> None:
        assert healthcheck().probe_host(host) == probe

    def test_established_to_needs_port_state_and_our_socket(self) -> None:
        check = healthcheck()
        assert check.established_to([ESTABLISHED_TO_8088], 8088, {777})
        assert not check.established_to([ESTABLISHED_TO_8088], 8088, {111})  # the listener's
        assert not check.established_to([ESTABLISHED_TO_8088], 8089, {777})
        closing = ESTABLISHED_TO_8088.replace(" 01 ", " 08 ")
        assert not check.established_to([closing], 8088, {777})

    def test_check_ari_reads_proc(self, tmp_path: Path) -> None:
        check = healthcheck()
        (tmp_path / "net").mkdir()
        (tmp_path / "net" / "tcp").write_text(ESTABLISHED_TO_8088)
        fds = tmp_path / "42" / "fd"
        fds.mkdir(parents=True)
        os.symlink("pipe:[5]", fds / "1")
        assert "no connection to ARI" in check.check_ari("http://127.0.0.1:8088", tmp_path)
        os.symlink("socket:[777]", fds / "7")
        assert check.check_ari("http://127.0.0.1:8088", tmp_path) is None

    def test_bad_settings_are_unhealthy(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        monkeypatch.setenv("AISPINNER_CONFIG", str(tmp_path / "missing.toml"))
        assert healthcheck().main() == 1
        assert "config file not found" in capsys.readouterr().out
