"""Settings: TOML + environment precedence, clear errors, and every setting documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from worker.config import AriTrunkSettings, RouteSettings, Settings, TrunkSettings, load_settings
from worker.errors import ConfigError

EXAMPLE = Path(__file__).parents[2] / "config" / "worker.example.toml"


def _field_names(model: type[BaseModel]) -> set[str]:
    return set(model.model_fields)


def issubclass_field(model: type[BaseModel], name: str) -> bool:
    """Whether ``model.name`` is a settings section of its own (a model, not a value)."""
    annotation = model.model_fields[name].annotation
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


class TestSettingsSources:
    def test_defaults_load_without_a_file(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("AISPINNER_CONFIG", raising=False)
        settings = load_settings()
        assert settings.sip.port == 5060
        assert settings.route_for("echo") is not None

    def test_environment_beats_file_and_file_beats_default(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        path = tmp_path / "w.toml"
        path.write_text('data_dir = "/srv/x"\n[sip]\nport = 5070\nhost = "127.0.0.2"\n')
        monkeypatch.setenv("AISPINNER_SIP__PORT", "5080")
        settings = load_settings(path)
        assert settings.sip.port == 5080
        assert settings.sip.host == "127.0.0.2"
        assert settings.data_dir == Path("/srv/x")

    def test_overrides_beat_environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("AISPINNER_SIP__PORT", "5080")
        assert load_settings(None, sip={"port": 6000}).sip.port == 6000

    def test_config_path_from_environment(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        path = tmp_path / "w.toml"
        path.write_text("[rtp]\nport_min = 40000\nport_max = 40100\n")
        monkeypatch.setenv("AISPINNER_CONFIG", str(path))
        assert load_settings().rtp.port_min == 40000


class TestSettingsErrors:
    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="not found"):
            load_settings(tmp_path / "nope.toml")

    def test_invalid_toml(self, tmp_path: Path) -> None:
        path = tmp_path / "w.toml"
        path.write_text("[sip\n")
        with pytest.raises(ConfigError, match="not valid TOML"):
            load_settings(path)

    def test_every_problem_is_listed_by_path(self, tmp_path: Path) -> None:
        path = tmp_path / "w.toml"
        path.write_text("[sip]\nport = 0\nbogus = 1\n[trunks.t]\ninbound_sources = ['x']\n")
        with pytest.raises(ConfigError) as info:
            load_settings(path)
        text = str(info.value)
        assert "sip.port" in text
        assert "sip.bogus" in text
        assert "trunks.t.host" in text

    def test_bad_cidr(self) -> None:
        with pytest.raises(ConfigError, match="not an IP address or CIDR"):
            load_settings(None, trunks={"t": {"host": "h", "inbound_sources": ["10.0.0.0/99"]}})

    def test_rtp_range_too_small(self) -> None:
        with pytest.raises(ConfigError, match="port_max"):
            load_settings(None, rtp={"port_min": 20000, "port_max": 20001})

    @pytest.mark.parametrize(
        ("rtp", "why"),
        [
            ({"jitter_min_ms": 0}, "jitter_min_ms"),  # the jitter buffer needs a positive floor
            ({"jitter_min_ms": 200, "jitter_max_ms": 200}, "must be below rtp.jitter_max_ms"),
        ],
    )
    def test_jitter_bounds_the_buffer_accepts(self, rtp: dict[str, int], why: str) -> None:
        """Settings the jitter buffer would refuse (which left every call without media)
        are refused when the settings load."""
        with pytest.raises(ConfigError, match=why):
            load_settings(None, rtp=rtp)

    @pytest.mark.parametrize(
        ("events", "why"),
        [
            ({"hub_url": "wss://hub.example/in", "hub_secret": "whsec_" + "A" * 32}, "http://"),
            ({"hub_url": "https://hub.example/in"}, "needs events.hub_secret"),
            ({"hub_url": "https://hub.example/in", "hub_secret": "plain"}, "hub_secret: .*whsec_"),
            ({"hub_url": "https://hub.example/in", "hub_secret": "whsec_QUJD"}, "24 to 64 bytes"),
        ],
    )
    def test_upstream_push_needs_an_http_url_and_a_whsec_secret(
        self, events: dict[str, str], why: str
    ) -> None:
        with pytest.raises(ConfigError, match=why):
            load_settings(None, events=events)

    def test_a_good_upstream_push_loads(self) -> None:
        secret = "whsec_" + "A" * 32
        settings = load_settings(None, events={"hub_url": "https://h/in", "hub_secret": secret})
        assert settings.events.hub_url == "https://h/in"


class TestRoutes:
    @pytest.mark.parametrize(
        ("pattern", "number", "expected"),
        [("*", "123", True), ("100", "100", True), ("100", "1000", False), ("+1*", "+1555", True)],
    )
    def test_matching(self, pattern: str, number: str, expected: bool) -> None:
        assert RouteSettings(match=pattern).matches(number) is expected

    def test_first_match_wins(self) -> None:
        settings = load_settings(
            None, routes=[{"match": "1*", "action": "reject"}, {"match": "*", "action": "echo"}]
        )
        route = settings.route_for("123")
        assert route is not None
        assert route.action == "reject"


class TestExampleDocumentsEverySetting:
    """config/worker.example.toml must mention every setting, and load as it is."""

    def test_example_loads(self) -> None:
        load_settings(EXAMPLE)

    def test_every_field_is_mentioned(self) -> None:
        text = EXAMPLE.read_text()
        mentioned = set(re.findall(r"^#?\s*([a-z0-9_]+)\s*=", text, flags=re.MULTILINE))
        headers = set(re.findall(r"^#?\s*\[\[?([a-z0-9_]+)[.\]]", text, flags=re.MULTILINE))
        sections: list[type[BaseModel]] = [Settings, TrunkSettings, RouteSettings, AriTrunkSettings]
        for name, field in Settings.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                sections.append(annotation)
            elif name not in {
                "trunks",
                "routes",
                "log",
                "sip",
                "rtp",
                "prompts",
                "ari",
                "api",
                "events",
            }:
                assert name in mentioned, name
        for model in sections:
            for name in _field_names(model):
                if issubclass_field(model, name):
                    assert name in headers, f"[{name}] has no section in the example"
                    continue
                if name in {
                    "log",
                    "sip",
                    "rtp",
                    "prompts",
                    "trunks",
                    "routes",
                    "users",
                    "custom_parameters",
                    "ari",
                    "api",
                    "events",
                }:
                    continue
                assert name in mentioned, f"{model.__name__}.{name} is not documented"


class TestPrivatePromptUrls:
    """Issue 11 #10: ``play`` from private hosts is allowed on a loopback (development) worker
    only, unless the setting says otherwise."""

    def test_defaults_follow_the_sip_host(self) -> None:
        assert load_settings(None).private_urls_allowed()
        assert not load_settings(None, sip={"host": "203.0.113.5"}).private_urls_allowed()
        assert load_settings(
            None, sip={"host": "203.0.113.5"}, prompts={"allow_private_urls": True}
        ).private_urls_allowed()
        assert not load_settings(None, prompts={"allow_private_urls": False}).private_urls_allowed()
