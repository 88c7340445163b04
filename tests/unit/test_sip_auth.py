"""Digest authentication (RFC 7616, RFC 2617, RFC 8760, RFC 3261 §22): the published example
vectors, nonce counting, and the stateless server's challenge / verify / stale cycle."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from types import MappingProxyType
from typing import Final

import pytest

from worker.sip.auth import (
    AuthError,
    AuthOutcome,
    DigestChallenge,
    DigestClient,
    DigestCredentials,
    DigestServer,
    UnsupportedChallengeError,
    challenge_header_names,
    choose_challenge,
    compute_response,
)

RFC7616_NONCE = "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v"
RFC7616_CNONCE = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ"
RFC7616_OPAQUE = "FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


class TestRfc7616Section3_9_1Examples:
    @pytest.mark.parametrize(
        ("algorithm", "expected"),
        [
            ("MD5", "8ca523f5e9506fed4657c9700eebdbec"),
            ("SHA-256", "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"),
        ],
    )
    def test_response_values(self, algorithm: str, expected: str) -> None:
        response = compute_response(
            algorithm=algorithm,
            username="Mufasa",
            password="Circle of Life",
            realm="http-auth@example.org",
            nonce=RFC7616_NONCE,
            method="GET",
            uri="/dir/index.html",
            qop="auth",
            nc="00000001",
            cnonce=RFC7616_CNONCE,
        )
        assert response == expected

    @pytest.mark.parametrize(
        ("algorithm", "expected"),
        [
            ("MD5", "8ca523f5e9506fed4657c9700eebdbec"),
            ("SHA-256", "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"),
        ],
    )
    def test_client_answers_the_published_challenge(self, algorithm: str, expected: str) -> None:
        challenge = DigestChallenge.parse(
            'Digest realm="http-auth@example.org", qop="auth, auth-int", '
            f'algorithm={algorithm}, nonce="{RFC7616_NONCE}", opaque="{RFC7616_OPAQUE}"'
        )
        assert challenge.qop == ("auth", "auth-int")
        assert challenge.algorithm == algorithm
        client = DigestClient("Mufasa", "Circle of Life")
        header = client.authorize(challenge, "GET", "/dir/index.html", cnonce=RFC7616_CNONCE)
        credentials = DigestCredentials.parse(header)
        assert credentials.response == expected
        assert credentials.qop == "auth"
        assert credentials.nc == "00000001"
        assert credentials.cnonce == RFC7616_CNONCE
        assert credentials.opaque == RFC7616_OPAQUE
        assert credentials.algorithm == algorithm
        assert (credentials.username, credentials.realm, credentials.uri) == (
            "Mufasa",
            "http-auth@example.org",
            "/dir/index.html",
        )


class TestRfc2617Section3_5Example:
    CHALLENGE = (
        'Digest realm="testrealm@host.com", qop="auth,auth-int", '
        'nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", opaque="5ccc069c403ebaf9f0171e9517f40e41"'
    )

    def test_response_value(self) -> None:
        challenge = DigestChallenge.parse(self.CHALLENGE)
        assert challenge.algorithm == "MD5"
        header = DigestClient("Mufasa", "Circle Of Life").authorize(
            challenge, "GET", "/dir/index.html", cnonce="0a4f113b"
        )
        credentials = DigestCredentials.parse(header)
        assert credentials.response == "6629fae49393a05397450978507c4ef1"
        assert credentials.opaque == "5ccc069c403ebaf9f0171e9517f40e41"
        assert DigestCredentials.parse(str(credentials)) == credentials


class TestRfc7616Section3_4ClientDetails:
    def test_nonce_count_per_nonce(self) -> None:
        client = DigestClient("alice", "secret")
        first = DigestChallenge(realm="r", nonce="n1", qop=("auth",))
        second = DigestChallenge(realm="r", nonce="n2", qop=("auth",))
        counts = [
            DigestCredentials.parse(client.authorize(challenge, "INVITE", "sip:b@h")).nc
            for challenge in (first, first, first, second, first)
        ]
        assert counts == ["00000001", "00000002", "00000003", "00000001", "00000004"]

    def test_random_cnonce(self) -> None:
        client = DigestClient("alice", "secret")
        challenge = DigestChallenge(realm="r", nonce="n", qop=("auth",))
        one = DigestCredentials.parse(client.authorize(challenge, "INVITE", "sip:b@h"))
        two = DigestCredentials.parse(client.authorize(challenge, "INVITE", "sip:b@h"))
        assert one.cnonce
        assert two.cnonce
        assert one.cnonce != two.cnonce

    def test_nonce_table_is_bounded(self) -> None:
        client = DigestClient("alice", "secret")
        for i in range(200):
            client.authorize(DigestChallenge("r", f"n{i}", qop=("auth",)), "REGISTER", "sip:r")
        again = client.authorize(DigestChallenge("r", "n199", qop=("auth",)), "REGISTER", "sip:r")
        assert DigestCredentials.parse(again).nc == "00000002"

    def test_legacy_challenge_without_qop(self) -> None:
        challenge = DigestChallenge.parse('Digest realm="asterisk",nonce="1a2b3c"')
        header = DigestClient("6001", "pw").authorize(challenge, "REGISTER", "sip:10.0.0.1")
        credentials = DigestCredentials.parse(header)
        ha1 = md5("6001:asterisk:pw")
        ha2 = md5("REGISTER:sip:10.0.0.1")
        assert credentials.response == md5(f"{ha1}:1a2b3c:{ha2}")
        assert credentials.qop is None
        assert credentials.nc is None
        assert credentials.cnonce is None
        assert "nc=" not in header
        assert "cnonce=" not in header

    def test_auth_int_hashes_the_body(self) -> None:
        challenge = DigestChallenge(realm="r", nonce="n", qop=("auth-int",))
        header = DigestClient("u", "p").authorize(
            challenge, "INVITE", "sip:b@h", body=b"v=0\r\n", cnonce="c"
        )
        credentials = DigestCredentials.parse(header)
        ha2 = md5("INVITE:sip:b@h:" + md5("v=0\r\n"))
        assert credentials.response == md5(f"{md5('u:r:p')}:n:00000001:c:auth-int:{ha2}")

    def test_sess_algorithm(self) -> None:
        challenge = DigestChallenge(realm="r", nonce="n", algorithm="MD5-sess", qop=("auth",))
        header = DigestClient("u", "p").authorize(challenge, "BYE", "sip:b@h", cnonce="c")
        ha1 = md5(f"{md5('u:r:p')}:n:c")
        expected = md5(f"{ha1}:n:00000001:c:auth:{md5('BYE:sip:b@h')}")
        assert DigestCredentials.parse(header).response == expected

    def test_unsupported_qop(self) -> None:
        challenge = DigestChallenge(realm="r", nonce="n", qop=("auth-conf",))
        with pytest.raises(UnsupportedChallengeError):
            DigestClient("u", "p").authorize(challenge, "INVITE", "sip:b@h")

    def test_header_names(self) -> None:
        assert challenge_header_names(401) == ("WWW-Authenticate", "Authorization")
        assert challenge_header_names(407) == ("Proxy-Authenticate", "Proxy-Authorization")


class TestRfc7616Section3_3ChallengeParsing:
    def test_empty_list_elements_are_ignored(self) -> None:
        challenge = DigestChallenge.parse('Digest realm="r",, nonce="n" ,')
        assert (challenge.realm, challenge.nonce) == ("r", "n")

    def test_fields_and_round_trip(self) -> None:
        challenge = DigestChallenge.parse(
            'digest realm="sip.example.com", nonce="abc", stale=TRUE, algorithm=sha-256, '
            'domain="sip:example.com", opaque="o, with comma", qop="auth"'
        )
        assert challenge == DigestChallenge(
            realm="sip.example.com",
            nonce="abc",
            algorithm="SHA-256",
            qop=("auth",),
            opaque="o, with comma",
            stale=True,
            domain="sip:example.com",
        )
        assert DigestChallenge.parse(str(challenge)).stale

    @pytest.mark.parametrize(
        "value",
        ['Digest realm="r"', 'Digest nonce="n"', "Digest realm", 'Digest realm="unterminated', ""],
    )
    def test_malformed(self, value: str) -> None:
        with pytest.raises(AuthError):
            DigestChallenge.parse(value)

    @pytest.mark.parametrize(
        "value", ['Basic realm="r"', 'Digest realm="r", nonce="n", algorithm=SHA-512-256']
    )
    def test_unsupported(self, value: str) -> None:
        with pytest.raises(UnsupportedChallengeError):
            DigestChallenge.parse(value)

    def test_credentials_missing_fields(self) -> None:
        with pytest.raises(AuthError):
            DigestCredentials.parse('Digest username="u", realm="r"')
        with pytest.raises(UnsupportedChallengeError):
            DigestCredentials.parse("Basic dXNlcjpwYXNz")


class TestRfc8760Section2_4ChallengeChoice:
    def test_prefers_sha256(self) -> None:
        chosen = choose_challenge(
            [
                'Digest realm="r", nonce="n1", algorithm=MD5, qop="auth"',
                'Basic realm="r"',
                'Digest realm="r", nonce="n2", algorithm=SHA-256, qop="auth"',
                'Digest realm="r", nonce="n3", algorithm=SHA-512-256, qop="auth"',
            ]
        )
        assert (chosen.algorithm, chosen.nonce) == ("SHA-256", "n2")

    def test_nothing_usable(self) -> None:
        with pytest.raises(UnsupportedChallengeError):
            choose_challenge(['Basic realm="r"'])


class TestRfc3261Section22_4ServerDigest:
    USERS: Final = MappingProxyType({"alice": "wonderland", "bob": "builder"})

    def server(
        self,
        *,
        algorithms: Sequence[str] = ("MD5",),
        qop: str | None = "auth",
        nonce_lifetime: float = 300.0,
    ) -> DigestServer:
        return DigestServer(
            "sip.example.com",
            b"0123456789abcdef",
            self.USERS,
            algorithms=algorithms,
            qop=qop,
            nonce_lifetime=nonce_lifetime,
        )

    def answer(
        self, server: DigestServer, now: float, user: str = "alice", password: str = "wonderland"
    ) -> str:
        challenge = DigestChallenge.parse(
            server.challenge(now, method="INVITE", uri="sip:bob@example.com")
        )
        return DigestClient(user, password).authorize(challenge, "INVITE", "sip:bob@example.com")

    @pytest.mark.parametrize("algorithm", ["MD5", "SHA-256", "MD5-sess", "SHA-256-sess"])
    def test_challenge_then_verify(self, algorithm: str) -> None:
        server = self.server(algorithms=[algorithm])
        challenge = DigestChallenge.parse(server.challenge(1000.0, method="INVITE", uri="sip:b@h"))
        assert challenge.algorithm == algorithm
        assert challenge.qop == ("auth",)
        assert not challenge.stale
        header = DigestClient("alice", "wonderland").authorize(challenge, "INVITE", "sip:b@h")
        result = server.verify(header, "INVITE", 1010.0, request_uri="sip:b@h")
        assert result.ok
        assert (result.outcome, result.username) == (AuthOutcome.OK, "alice")

    def test_wrong_password_and_unknown_user(self) -> None:
        server = self.server()
        assert server.verify(self.answer(server, 0.0, password="x"), "INVITE", 1.0).outcome is (
            AuthOutcome.REJECTED
        )
        unknown = server.verify(self.answer(server, 0.0, user="mallory"), "INVITE", 1.0)
        assert (unknown.outcome, unknown.reason) == (AuthOutcome.REJECTED, "unknown user")

    def test_wrong_method_is_rejected(self) -> None:
        server = self.server()
        assert server.verify(self.answer(server, 0.0), "BYE", 1.0).outcome is AuthOutcome.REJECTED

    def test_stale_nonce(self) -> None:
        server = self.server(nonce_lifetime=60.0)
        header = self.answer(server, 0.0)
        assert server.verify(header, "INVITE", 60.0).ok
        stale = server.verify(self.answer(server, 0.0), "INVITE", 60.5)
        assert stale.outcome is AuthOutcome.STALE
        again = DigestChallenge.parse(server.challenge(60.5, stale=True))
        assert again.stale
        wrong_and_stale = server.verify(self.answer(server, 0.0, password="x"), "INVITE", 61.0)
        assert wrong_and_stale.outcome is AuthOutcome.REJECTED

    def test_foreign_or_tampered_nonce(self) -> None:
        server = self.server()
        other = DigestServer("sip.example.com", b"another secret", self.USERS)
        assert server.verify(self.answer(other, 0.0), "INVITE", 1.0).reason == (
            "nonce not issued here"
        )
        for nonce in ("short", "!!!!", "A" * 43):
            challenge = DigestChallenge(realm="sip.example.com", nonce=nonce, qop=("auth",))
            header = DigestClient("alice", "wonderland").authorize(challenge, "INVITE", "sip:b")
            assert server.verify(header, "INVITE", 1.0).outcome is AuthOutcome.REJECTED

    def test_nonce_from_the_future(self) -> None:
        server = self.server()
        assert server.verify(self.answer(server, 100.0), "INVITE", 50.0).outcome is (
            AuthOutcome.REJECTED
        )

    def test_nonces_are_unique_and_self_describing(self) -> None:
        server = self.server()
        one, two = server.make_nonce(5.0), server.make_nonce(5.0)
        assert one != two
        assert server.nonce_issued_at(one) == 5.0

    def test_realm_algorithm_and_uri_checks(self) -> None:
        server = self.server()
        nonce = server.make_nonce(0.0)
        client = DigestClient("alice", "wonderland")
        wrong_realm = client.authorize(
            DigestChallenge("other", nonce, qop=("auth",)), "INVITE", "sip:b"
        )
        assert server.verify(wrong_realm, "INVITE", 1.0).reason == "wrong realm"
        sha = client.authorize(
            DigestChallenge("sip.example.com", nonce, "SHA-256", ("auth",)), "INVITE", "sip:b"
        )
        assert server.verify(sha, "INVITE", 1.0).reason == "algorithm not offered"
        good = self.answer(server, 0.0)
        assert server.verify(good, "INVITE", 1.0, request_uri="sip:other").outcome is (
            AuthOutcome.REJECTED
        )

    def test_malformed_credentials(self) -> None:
        server = self.server()
        assert server.verify("Digest garbage", "INVITE", 0.0).outcome is AuthOutcome.MALFORMED
        bad_qop = self.answer(server, 0.0).replace("qop=auth", "qop=auth-conf")
        assert server.verify(bad_qop, "INVITE", 1.0).outcome is AuthOutcome.MALFORMED

    def test_both_algorithms_offered_strongest_first(self) -> None:
        server = self.server(algorithms=["MD5", "SHA-256"])
        values = server.challenges(0.0, method="REGISTER", uri="sip:example.com")
        assert [DigestChallenge.parse(v).algorithm for v in values] == ["SHA-256", "MD5"]
        chosen = choose_challenge(values)
        header = DigestClient("bob", "builder").authorize(chosen, "REGISTER", "sip:example.com")
        assert server.verify(header, "REGISTER", 1.0).ok

    def test_legacy_client_when_server_offers_no_qop(self) -> None:
        server = self.server(qop=None)
        challenge = DigestChallenge.parse(server.challenge(0.0, method="INVITE", uri="sip:b"))
        assert challenge.qop == ()
        header = DigestClient("alice", "wonderland").authorize(challenge, "INVITE", "sip:b")
        assert "qop" not in header
        assert server.verify(header, "INVITE", 1.0).ok


class TestRfc7616Section3_3ReplayAndBinding:
    """Issue 11 #7: a nonce is good only for the method and Request-URI it challenged, its
    ``nc`` must grow, and ``qop`` is required."""

    USERS: Final = MappingProxyType({"alice": "wonderland"})

    def setup_method(self) -> None:
        self.server = DigestServer("sip.example.com", b"0123456789abcdef", self.USERS)
        self.challenge = DigestChallenge.parse(
            self.server.challenge(0.0, method="INVITE", uri="sip:bob@example.com")
        )
        self.client = DigestClient("alice", "wonderland")

    def test_the_same_header_twice_is_a_replay(self) -> None:
        header = self.client.authorize(self.challenge, "INVITE", "sip:bob@example.com")
        assert self.server.verify(header, "INVITE", 1.0).ok
        again = self.server.verify(header, "INVITE", 2.0)
        assert (again.outcome, again.reason) == (AuthOutcome.REJECTED, "replayed nonce count")
        assert self.server.replays == 1
        following = self.client.authorize(self.challenge, "INVITE", "sip:bob@example.com")
        assert self.server.verify(following, "INVITE", 3.0).ok  # nc 2 is new

    def test_another_uri_or_method_cannot_use_the_nonce(self) -> None:
        other_uri = self.client.authorize(self.challenge, "INVITE", "sip:carol@example.com")
        assert self.server.verify(other_uri, "INVITE", 1.0).reason == "nonce not issued here"
        other_method = self.client.authorize(self.challenge, "OPTIONS", "sip:bob@example.com")
        assert self.server.verify(other_method, "OPTIONS", 1.0).reason == "nonce not issued here"

    def test_qop_is_required(self) -> None:
        legacy = DigestChallenge(self.challenge.realm, self.challenge.nonce)
        header = self.client.authorize(legacy, "INVITE", "sip:bob@example.com")
        assert self.server.verify(header, "INVITE", 1.0).reason == "qop required"

    def test_a_forgotten_nonce_only_restarts_at_one(self) -> None:
        server = DigestServer("sip.example.com", b"0123456789abcdef", self.USERS, max_nonces=1)
        first = DigestChallenge.parse(server.challenge(0.0, method="INVITE", uri="sip:b"))
        second = DigestChallenge.parse(server.challenge(0.0, method="INVITE", uri="sip:b"))
        client = DigestClient("alice", "wonderland")
        one = client.authorize(first, "INVITE", "sip:b")
        assert server.verify(one, "INVITE", 1.0).ok
        assert server.verify(client.authorize(second, "INVITE", "sip:b"), "INVITE", 1.0).ok
        later = client.authorize(first, "INVITE", "sip:b")  # nc 2 of a forgotten nonce
        assert server.verify(later, "INVITE", 2.0).outcome is AuthOutcome.STALE
