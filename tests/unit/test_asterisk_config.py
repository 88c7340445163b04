"""``aispinner-worker asterisk-config`` (``worker.asterisk_config``): each rendered file is parsed
back the way Asterisk's config loader reads it (sections, templates, ``key = value``,
``exten =>``/``same =>``, ``;`` comments with ``\\;`` escapes) and checked for what the ARI
ingress relies on, against the configuration the ARI recordings were made with
(tests/data/ari/README.md)."""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest

from worker.ari.trunks import trunk_objects
from worker.asterisk_config import TEMPLATES, TRANSPORTS, render, write
from worker.cli import main
from worker.config import Settings, load_settings
from worker.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE_DIR = ROOT / "worker" / "dialplan"
PATTERNS = {"_X!", "_+X!", "_[a-zA-Z]!", "s"}
SORCERY_MODULE = {
    "auth": "res_pjsip",
    "aor": "res_pjsip",
    "endpoint": "res_pjsip",
    "identify": "res_pjsip_endpoint_identifier_ip",
    "registration": "res_pjsip_outbound_registration",
}
"""The module whose sorcery.conf section maps each PJSIP object type."""


@pytest.fixture(autouse=True)
def _no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings from the keyword arguments alone, whatever this shell exports."""
    for name in list(os.environ):
        if name.startswith("AISPINNER_"):
            monkeypatch.delenv(name)


def settings(**overrides: Any) -> Settings:
    return load_settings(None, **{"ingress": ["ari"], **overrides})


# -- a small Asterisk config parser (main/config.c's rules, as far as these files need) ----------


@dataclass
class Section:
    name: str
    template: bool = False
    """``[name](!)``: a template, not an object."""
    inherits: list[str] = field(default_factory=list)
    entries: list[tuple[str, str, str]] = field(default_factory=list)
    """(key, operator ``=`` or ``=>``, value) in file order; keys may repeat."""

    def values(self, key: str) -> list[str]:
        return [value for k, _, value in self.entries if k == key]

    def one(self, key: str) -> str:
        (value,) = self.values(key)
        return value


SECTION = re.compile(r"^\[([^\]]+)\](?:\(([^)]*)\))?$")


def strip_comment(line: str) -> str:
    """Cut at the first ``;`` that is not escaped; ``\\;`` becomes ``;``."""
    out: list[str] = []
    i = 0
    while i < len(line):
        char = line[i]
        if char == "\\" and line[i + 1 : i + 2] == ";":
            out.append(";")
            i += 2
            continue
        if char == ";":
            break
        out.append(char)
        i += 1
    return "".join(out).strip()


def parse_config(text: str) -> list[Section]:
    sections: list[Section] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = strip_comment(raw)
        if not line:
            continue
        if line.startswith("["):
            match = SECTION.match(line)
            assert match, f"line {number}: bad section header {raw!r}"
            options = [o.strip() for o in (match.group(2) or "").split(",") if o.strip()]
            sections.append(
                Section(
                    match.group(1),
                    template="!" in options,
                    inherits=[o for o in options if o != "!"],
                )
            )
            continue
        assert sections, f"line {number}: {raw!r} outside any section"
        parts = re.split(r"\s*(=>|=)\s*", line, maxsplit=1)
        assert len(parts) == 3, f"line {number}: no '=' in {raw!r}"
        key, op, value = parts
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key), f"line {number}: {raw!r}"
        sections[-1].entries.append((key, op, value))
    return sections


def by_name(sections: list[Section]) -> dict[str, Section]:
    names = [s.name for s in sections]
    assert len(names) == len(set(names)), f"a section appears twice: {names}"
    return {s.name: s for s in sections}


@dataclass
class Extension:
    pattern: str
    steps: list[tuple[str, str]]
    """(application, its arguments) in priority order."""


def dialplan(section: Section) -> list[Extension]:
    """``exten => pattern,1,App(args)`` then ``same => n,App(args)`` lines, as extensions."""
    out: list[Extension] = []
    for key, op, value in section.entries:
        assert op == "=>", (key, value)
        if key == "exten":
            pattern, priority, app = value.split(",", 2)
            assert priority == "1", value
            out.append(Extension(pattern, []))
        else:
            assert key == "same", key
            priority, app = value.split(",", 1)
            assert priority == "n", value
        name, _, args = app.partition("(")
        assert args.endswith(")"), app
        out[-1].steps.append((name, args[:-1]))
    return out


def parsed(files: dict[str, str], name: str) -> dict[str, Section]:
    return by_name(parse_config(files[name]))


class TestParser:
    """The test's parser itself, so that what it says of the rendered files can be trusted."""

    def test_reads_sections_templates_and_operators(self) -> None:
        text = "[a](!)\nk = v ; c\n[b](a,x)\nexten => s,1,NoOp(\\;)\n"
        a, b = parse_config(text)
        assert (a.name, a.template, a.entries) == ("a", True, [("k", "=", "v")])
        assert (b.template, b.inherits, b.entries) == (
            False,
            ["a", "x"],
            [("exten", "=>", "s,1,NoOp(;)")],
        )

    def test_rejects_what_asterisk_would_not_read(self) -> None:
        with pytest.raises(AssertionError):
            parse_config("k = v\n")
        with pytest.raises(AssertionError):
            parse_config("[a\n")
        with pytest.raises(AssertionError):
            parse_config("[a]\nk v\n")


# -- what is rendered ---------------------------------------------------------------------------


class TestRenderedFiles:
    def test_every_template_is_rendered_and_no_placeholder_is_left(self) -> None:
        files = render(settings())
        assert list(files) == list(TEMPLATES)
        assert sorted(p.name for p in TEMPLATE_DIR.glob("*.conf")) == sorted(TEMPLATES)
        for name, text in files.items():
            assert "@@" not in text, name
            parse_config(text)

    def test_asterisk_variables_pass_through_untouched(self) -> None:
        files = render(settings())
        template = (TEMPLATE_DIR / "extensions.conf").read_text()
        for variable in ("${EXTEN}", "${CALLERID(num)}"):
            assert variable in template
            assert files["extensions.conf"].count(variable) == template.count(variable)


class TestExtensionsConf:
    def test_every_number_goes_to_stasis_inbound(self) -> None:
        """As recorded: StasisStart args ["inbound"], the number in channel.dialplan.exten."""
        contexts = parsed(render(settings()), "extensions.conf")
        assert list(contexts) == ["from-trunk"]
        extensions = dialplan(contexts["from-trunk"])
        assert {e.pattern for e in extensions} == PATTERNS
        for extension in extensions:
            assert [app for app, _ in extension.steps] == ["NoOp", "Stasis", "Hangup"]
            assert extension.steps[1][1] == "aispinner,inbound"

    def test_app_name_from_settings(self) -> None:
        contexts = parsed(render(settings(ari={"app": "voice-bot_2"})), "extensions.conf")
        for extension in dialplan(contexts["from-trunk"]):
            assert dict(extension.steps)["Stasis"] == "voice-bot_2,inbound"

    def test_each_trunk_context_gets_the_same_dialplan(self) -> None:
        trunks = {
            "carrier": {"host": "192.0.2.10", "context": "from-carrier"},
            "other": {"host": "192.0.2.11"},
        }
        contexts = parsed(render(settings(ari={"trunks": trunks})), "extensions.conf")
        assert list(contexts) == ["from-trunk", "from-carrier"]
        for section in contexts.values():
            assert {e.pattern for e in dialplan(section)} == PATTERNS

    @pytest.mark.parametrize("app", ["a,b", "a)b", "a b", "${X}", "", "a;b"])
    def test_app_names_that_break_the_dialplan_are_refused(self, app: str) -> None:
        with pytest.raises(ConfigError, match=r"ari\.app"):
            render(settings(ari={"app": app}))

    def test_a_trunk_context_that_is_no_section_name_is_refused(self) -> None:
        trunks = {"carrier": {"host": "192.0.2.10", "context": "from carrier"}}
        with pytest.raises(ConfigError, match=r"ari\.trunks\.carrier\.context"):
            render(settings(ari={"trunks": trunks}))


class TestAriConf:
    def test_the_workers_user(self) -> None:
        sections = parsed(render(settings()), "ari.conf")
        general = sections["general"]
        assert (general.one("enabled"), general.one("pretty")) == ("yes", "no")
        user = sections["aispinner"]
        assert user.one("type") == "user"
        assert user.one("read_only") == "no"
        assert user.one("password_format") == "plain"
        assert user.one("password") == "aispinner"

    def test_credentials_from_settings_survive_asterisk_comment_rules(self) -> None:
        password = "s3cr;et #[x] ${Y}\\"
        files = render(settings(ari={"username": "bot.user", "password": password}))
        sections = parsed(files, "ari.conf")
        assert set(sections) == {"general", "bot.user"}
        assert sections["bot.user"].one("password") == password

    @pytest.mark.parametrize("password", ["a\nb", " leading", "trailing ", "", "a\x00b"])
    def test_passwords_that_cannot_be_written_are_refused(self, password: str) -> None:
        with pytest.raises(ConfigError, match=r"ari\.password"):
            render(settings(ari={"password": password}))

    @pytest.mark.parametrize("username", ["a]b", "a b", "a:b", "", "[x"])
    def test_usernames_that_cannot_be_sections_are_refused(self, username: str) -> None:
        with pytest.raises(ConfigError, match=r"ari\.username"):
            render(settings(ari={"username": username}))


class TestHttpConf:
    @pytest.mark.parametrize(
        ("url", "address", "port"),
        [
            ("http://127.0.0.1:8088", "127.0.0.1", "8088"),
            ("http://10.1.2.3:8089/", "10.1.2.3", "8089"),
            ("http://localhost:8088", "127.0.0.1", "8088"),
            ("http://[::1]:8090", "::1", "8090"),
            ("http://192.0.2.7", "192.0.2.7", "80"),
        ],
    )
    def test_binds_where_the_worker_connects(self, url: str, address: str, port: str) -> None:
        general = parsed(render(settings(ari={"url": url})), "http.conf")["general"]
        assert general.one("enabled") == "yes"
        assert (general.one("bindaddr"), general.one("bindport")) == (address, port)

    @pytest.mark.parametrize(
        ("url", "says"),
        [
            ("https://127.0.0.1:8089", "tlsenable"),
            ("http://asterisk.internal:8088", "host name"),
            ("http://127.0.0.1:8088/asterisk", "has a path"),
            ("http://u:p@127.0.0.1:8088", "credentials"),
        ],
    )
    def test_urls_http_conf_cannot_serve_are_refused(self, url: str, says: str) -> None:
        with pytest.raises(ConfigError, match=says) as info:
            render(settings(ari={"url": url}))
        assert "ari.url" in str(info.value)


class TestRtpConf:
    def test_range_from_settings_apart_from_the_workers(self) -> None:
        ours = settings(
            ari={"asterisk_rtp_port_min": 40000, "asterisk_rtp_port_max": 40999},
            rtp={"port_min": 20000, "port_max": 30000},
        )
        general = parsed(render(ours), "rtp.conf")["general"]
        start, end = int(general.one("rtpstart")), int(general.one("rtpend"))
        assert (start, end) == (40000, 40999)
        assert end < ours.rtp.port_min or start > ours.rtp.port_max
        assert general.one("icesupport") == "no"

    def test_overlap_is_refused_even_without_ari_ingress(self) -> None:
        """Settings validation only compares the ranges when ingress includes "ari"."""
        overlapping = load_settings(
            None,
            ingress=["sip"],
            sip={"port": 5070},
            ari={"asterisk_rtp_port_min": 25000, "asterisk_rtp_port_max": 26000},
        )
        with pytest.raises(ConfigError) as info:
            render(overlapping)
        assert "ari.asterisk_rtp_port_min..max" in str(info.value)
        assert "rtp.port_min..max" in str(info.value)


class TestSorceryConf:
    def test_five_object_types_config_then_memory_in_their_modules(self) -> None:
        """The mapping the dynamic_config recording ran with, plus registration (PROTOCOLS 5.1):
        identify belongs to res_pjsip_endpoint_identifier_ip."""
        sections = parsed(render(settings()), "sorcery.conf")
        mapped = {
            (name, key) for name, section in sections.items() for key, _, _ in section.entries
        }
        assert mapped == {(module, kind) for kind, module in SORCERY_MODULE.items()}
        for kind, module in SORCERY_MODULE.items():
            assert sections[module].values(kind) == [
                f"config,pjsip.conf,criteria=type={kind}",
                "memory",
            ]


class TestWhatTheWorkerPushes:
    """The trunk objects ``worker.ari.trunks`` pushes must land where the rendered files let
    them: a writable (memory) type in the module that owns it, a transport pjsip.conf defines,
    a context extensions.conf sends to Stasis."""

    @pytest.mark.parametrize("transport", ["udp", "tcp"])
    def test_pushed_trunks_fit_the_rendered_files(self, transport: str) -> None:
        trunk = {
            "host": "192.0.2.10",
            "transport": transport,
            "username": "acct",
            "password": "pw",
            "registration": True,
            "context": "from-carrier",
        }
        ours = settings(ari={"trunks": {"carrier": trunk}})
        files = render(ours)
        sorcery = parsed(files, "sorcery.conf")
        pjsip = parsed(files, "pjsip.conf")
        contexts = parsed(files, "extensions.conf")
        objects = trunk_objects("carrier", ours.ari.trunks["carrier"])
        assert {o.object_type for o in objects} == set(SORCERY_MODULE)
        for obj in objects:
            assert "memory" in sorcery[SORCERY_MODULE[obj.object_type]].values(obj.object_type)
            fields = dict(obj.fields)
            if "transport" in fields:
                assert pjsip[fields["transport"]].one("protocol") == transport
            if "context" in fields:
                assert fields["context"] in contexts


class TestPjsipConf:
    def test_transports_bind_asterisks_sip_port(self) -> None:
        sections = parsed(
            render(settings(ari={"asterisk_sip_host": "192.0.2.5", "asterisk_sip_port": 5080})),
            "pjsip.conf",
        )
        for protocol, name in TRANSPORTS.items():
            transport = sections[name]
            assert transport.one("type") == "transport"
            assert transport.one("protocol") == protocol
            assert transport.one("bind") == "192.0.2.5:5080"

    def test_ipv6_bind_is_bracketed(self) -> None:
        sections = parsed(render(settings(ari={"asterisk_sip_host": "::"})), "pjsip.conf")
        assert sections["transport-udp"].one("bind") == "[::]:5060"

    def test_trunk_templates_carry_the_recorded_endpoint_options(self) -> None:
        sections = parsed(render(settings()), "pjsip.conf")
        endpoint = sections["trunk-endpoint"]
        assert endpoint.template
        assert dict((k, v) for k, _, v in endpoint.entries) == {
            "type": "endpoint",
            "context": "from-trunk",
            "disallow": "all",
            "allow": "ulaw,alaw",
            "direct_media": "no",
            "rtp_symmetric": "yes",
            "force_rport": "yes",
            "rewrite_contact": "yes",
            "ice_support": "no",
            "dtmf_mode": "rfc4733",
        }
        for name, kind in (
            ("trunk-aor", "aor"),
            ("trunk-auth", "auth"),
            ("trunk-identify", "identify"),
        ):
            assert sections[name].template
            assert sections[name].one("type") == kind

    def test_a_host_name_is_refused(self) -> None:
        with pytest.raises(ConfigError, match=r"ari\.asterisk_sip_host"):
            render(settings(ari={"asterisk_sip_host": "pbx.example"}))


class TestPortClashes:
    def test_asterisk_sip_port_on_the_workers_sip_port(self) -> None:
        both = load_settings(None, ingress=["sip", "ari"])  # both on 5060; 0.0.0.0 and 127.0.0.1
        with pytest.raises(ConfigError) as info:
            render(both)
        message = str(info.value)
        assert "ari.asterisk_sip_port" in message
        assert "sip.port" in message

    def test_different_addresses_do_not_clash(self) -> None:
        apart = load_settings(
            None,
            ingress=["sip", "ari"],
            sip={"host": "127.0.0.1"},
            ari={"asterisk_sip_host": "192.0.2.5"},
        )
        assert parsed(render(apart), "pjsip.conf")["transport-udp"].one("bind") == "192.0.2.5:5060"

    def test_the_workers_sip_port_does_not_count_without_sip_ingress(self) -> None:
        render(settings(sip={"port": 5060}, ari={"asterisk_sip_port": 5060}))

    def test_asterisk_sip_port_on_its_own_http_port(self) -> None:
        with pytest.raises(ConfigError, match=r"the port of ari\.url"):
            render(settings(ari={"asterisk_sip_port": 8088}))

    def test_asterisk_sip_port_inside_its_rtp_range(self) -> None:
        with pytest.raises(ConfigError, match=r"ari\.asterisk_rtp_port_min\.\.max"):
            render(settings(ari={"asterisk_sip_port": 15060}))


class TestWrite:
    def test_writes_what_render_returns(self, tmp_path: Path) -> None:
        ours = settings(ari={"password": "pw;1"})
        out = tmp_path / "a" / "b"
        paths = write(ours, out)
        assert [p.name for p in paths] == list(TEMPLATES)
        assert {p.name: p.read_text() for p in paths} == render(ours)

    def test_nothing_written_when_refused(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError):
            write(settings(ari={"url": "https://127.0.0.1:8089"}), tmp_path / "out")
        assert not (tmp_path / "out").exists()

    def test_templates_ship_in_the_wheel(self) -> None:
        """The command must work from an installed wheel: package data covers every template."""
        pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
        globs = pyproject["tool"]["setuptools"]["package-data"]["worker"]
        for name in TEMPLATES:
            assert any(fnmatch(f"dialplan/{name}", g) for g in globs), name


class TestCommand:
    def test_writes_the_files_and_says_what_next(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        config = tmp_path / "worker.toml"
        config.write_text('ingress = ["ari"]\n[ari]\npassword = "pw"\napp = "bot"\n')
        out = tmp_path / "asterisk"
        assert main(["--config", str(config), "asterisk-config", "--out", str(out)]) == 0
        printed = capsys.readouterr().out
        for name in TEMPLATES:
            assert f"wrote {out / name}" in printed
        assert "/etc/asterisk" in printed
        assert "restart Asterisk" in printed
        sections = by_name(parse_config((out / "ari.conf").read_text()))
        assert sections["aispinner"].one("password") == "pw"
        stasis = dialplan(
            by_name(parse_config((out / "extensions.conf").read_text()))["from-trunk"]
        )
        assert dict(stasis[0].steps)["Stasis"] == "bot,inbound"

    def test_without_ari_ingress_it_says_to_set_it(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        config = tmp_path / "worker.toml"
        config.write_text('ingress = ["sip"]\n[sip]\nport = 5070\n')
        assert main(["--config", str(config), "asterisk-config", "--out", str(tmp_path)]) == 0
        assert 'set ingress = ["ari"]' in capsys.readouterr().out

    def test_clashing_port_exits_2_naming_both_settings(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        config = tmp_path / "worker.toml"
        config.write_text(
            'ingress = ["sip", "ari"]\n[sip]\nport = 5080\n[ari]\nasterisk_sip_port = 5080\n'
        )
        out = tmp_path / "asterisk"
        with pytest.raises(SystemExit) as info:
            main(["--config", str(config), "asterisk-config", "--out", str(out)])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("aispinner-worker: ")
        assert "ari.asterisk_sip_port" in err
        assert "sip.port" in err
        assert not out.exists()

    def test_out_is_required(self) -> None:
        with pytest.raises(SystemExit) as info:
            main(["asterisk-config"])
        assert info.value.code == 2
