"""worker/signing.py and worker/events/webhooks.py, no sockets: the Standard Webhooks signature
(checked by the reference ``standardwebhooks`` library: good signatures pass, a tampered body or
id, an old or future timestamp and a wrong key fail), secrets, the request body, the event types
a webhook may ask for, and the log throttle."""

from __future__ import annotations

import base64
import json
import time

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from worker.events.webhooks import EVENT_TYPES, LOG_EVERY_S, _redacted, webhook_body
from worker.log import LogThrottle
from worker.signing import SECRET_PREFIX, generate_secret, secret_key, sign, signed_headers

# The example of the Standard Webhooks reference libraries' tests.
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TIMESTAMP = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def headers_now(secret: str, body: bytes, message_id: str = "msg_1") -> dict[str, str]:
    return signed_headers(secret, message_id, int(time.time()), body)


class TestStandardWebhooksSignature:
    def test_the_spec_example(self) -> None:
        key = secret_key(SPEC_SECRET)
        assert sign(key, SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY) == SPEC_SIGNATURE

    def test_headers_verify_with_the_reference_library(self) -> None:
        secret = generate_secret()
        body = webhook_body(42, {"type": "call.done", "call_id": "c1", "status": "completed"})
        headers = headers_now(secret, body, "msg_7")
        assert set(headers) == {"webhook-id", "webhook-timestamp", "webhook-signature"}
        assert headers["webhook-id"] == "msg_7"
        assert headers["webhook-signature"].startswith("v1,")
        assert Webhook(secret).verify(body, headers) == json.loads(body)

    def test_a_tampered_body_fails(self) -> None:
        secret = generate_secret()
        body = webhook_body(1, {"type": "call.dtmf", "digit": "5"})
        headers = headers_now(secret, body)
        with pytest.raises(WebhookVerificationError, match="signature"):
            Webhook(secret).verify(body.replace(b'"5"', b'"6"'), headers)

    def test_a_changed_message_id_fails(self) -> None:
        secret = generate_secret()
        body = webhook_body(1, {"type": "call.dtmf", "digit": "5"})
        headers = headers_now(secret, body)
        with pytest.raises(WebhookVerificationError, match="signature"):
            Webhook(secret).verify(body, {**headers, "webhook-id": "msg_2"})

    def test_a_replayed_old_timestamp_is_rejected(self) -> None:
        secret = generate_secret()
        body = webhook_body(1, {"type": "call.started"})
        old = int(time.time()) - 10 * 60  # the library allows 5 minutes
        headers = signed_headers(secret, "msg_1", old, body)
        with pytest.raises(WebhookVerificationError, match="too old"):
            Webhook(secret).verify(body, headers)

    def test_a_future_timestamp_is_rejected(self) -> None:
        secret = generate_secret()
        body = webhook_body(1, {"type": "call.started"})
        headers = signed_headers(secret, "msg_1", int(time.time()) + 10 * 60, body)
        with pytest.raises(WebhookVerificationError, match="too new"):
            Webhook(secret).verify(body, headers)

    def test_another_secret_fails(self) -> None:
        body = webhook_body(1, {"type": "call.started"})
        headers = headers_now(generate_secret(), body)
        with pytest.raises(WebhookVerificationError):
            Webhook(generate_secret()).verify(body, headers)

    def test_several_secrets_give_space_separated_signatures(self) -> None:
        old, new = generate_secret(), generate_secret()
        body = webhook_body(3, {"type": "call.status", "status": "ringing"})
        headers = signed_headers([old, new], "msg_3", int(time.time()), body)
        assert len(headers["webhook-signature"].split(" ")) == 2
        Webhook(old).verify(body, headers)
        Webhook(new).verify(body, headers)


class TestSecrets:
    def test_generated_secrets_are_whsec_base64_of_24_bytes_and_differ(self) -> None:
        made = {generate_secret() for _ in range(20)}
        assert len(made) == 20
        for secret in made:
            assert secret.startswith(SECRET_PREFIX)
            assert base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True) == secret_key(
                secret
            )
            assert len(secret_key(secret)) == 24

    def test_unpadded_base64_is_taken(self) -> None:
        key = bytes(range(32))
        unpadded = base64.b64encode(key).decode().rstrip("=")
        assert secret_key(SECRET_PREFIX + unpadded) == key

    @pytest.mark.parametrize(
        ("secret", "why"),
        [
            ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "starts with"),
            ("whsec_", "24 to 64 bytes"),
            ("whsec_" + base64.b64encode(b"short").decode(), "24 to 64 bytes"),
            ("whsec_" + base64.b64encode(bytes(65)).decode(), "24 to 64 bytes"),
            ("whsec_not*base64*at*all*not*base64*at*all", "base64"),
        ],
    )
    def test_malformed_secrets_are_refused(self, secret: str, why: str) -> None:
        with pytest.raises(ValueError, match=why):
            secret_key(secret)

    def test_signing_with_a_malformed_secret_raises(self) -> None:
        with pytest.raises(ValueError, match="starts with"):
            signed_headers("plain", "msg_1", 1, b"{}")


class TestBodyAndTypes:
    def test_the_body_is_the_event_with_its_outbox_id(self) -> None:
        payload = {"type": "call.transcript", "call_id": "c1", "text": "Héllo"}
        body = webhook_body(99, payload)
        assert json.loads(body) == {**payload, "id": 99}
        assert b" " not in body.replace(b"H\xc3\xa9llo", b"")  # compact

    def test_the_known_event_types(self) -> None:
        assert EVENT_TYPES == (
            "call.started",
            "call.status",
            "call.done",
            "call.dtmf",
            "call.interruption",
            "call.voicemail_detected",
            "call.transcript",
            "journal.new",
        )


class TestLogThrottle:
    """The dispatcher's failure lines: worker.log's throttle, one line per (kind, endpoint)
    per LOG_EVERY_S, with a count of what was held back."""

    def test_one_line_per_key_per_interval_and_a_count_of_the_rest(self) -> None:
        assert LOG_EVERY_S == 60.0
        throttle = LogThrottle(lines=1, interval_s=LOG_EVERY_S)
        assert throttle.allow("timeout:1", 0.0) == 0
        assert throttle.allow("timeout:1", 10.0) is None
        assert throttle.allow("timeout:1", 20.0) is None
        assert throttle.allow("status:1", 20.0) == 0  # another kind
        assert throttle.allow("timeout:2", 20.0) == 0  # another endpoint
        assert throttle.allow("timeout:1", 61.0) == 2  # two held back
        assert throttle.allow("timeout:1", 62.0) is None


class TestRedaction:
    @pytest.mark.parametrize(
        ("url", "shown"),
        [
            (
                "https://user:pw@hooks.example.com:8443/in?token=x#f",
                "https://hooks.example.com:8443/in",
            ),
            ("http://[::1]:9000/h", "http://[::1]:9000/h"),
            ("http://host:99999/", "<invalid URL>"),
        ],
    )
    def test_no_credentials_or_query_in_logs(self, url: str, shown: str) -> None:
        assert _redacted(url) == shown
