"""G.711 against CPython's ``audioop`` (every input) and ffmpeg (SIPp's PCMA capture)."""

from __future__ import annotations

import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from media import g711
from media.rtp import RtpPacket
from tests.pcap import LINKTYPE_ETHERNET, read_pcap

EVERY_SAMPLE = np.arange(65536, dtype=np.uint32).astype(np.uint16).astype("<u2").tobytes()
EVERY_CODE = bytes(range(256))

Transcode = Callable[[bytes], bytes]


@pytest.fixture(scope="module")
def audioop() -> ModuleType:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import audioop

    return audioop


class TestG711MuLawBitExact:
    def test_encode_every_sample_like_audioop(self, audioop: ModuleType) -> None:
        assert g711.ulaw_encode(EVERY_SAMPLE) == audioop.lin2ulaw(EVERY_SAMPLE, 2)

    def test_decode_every_code_like_audioop(self, audioop: ModuleType) -> None:
        assert g711.ulaw_decode(EVERY_CODE) == audioop.ulaw2lin(EVERY_CODE, 2)

    def test_clip_case(self, audioop: ModuleType) -> None:
        # -32768 >> 2 is past the 14-bit clip: audioop answers 0x7F ^ 0x7F.
        loudest = np.array([-32768, -32767, 32767], dtype="<i2").tobytes()
        assert g711.ulaw_encode(loudest) == audioop.lin2ulaw(loudest, 2) == b"\x00\x00\x80"

    def test_decode_then_encode_is_identity_except_negative_zero(self) -> None:
        again = g711.ulaw_encode(g711.ulaw_decode(EVERY_CODE))
        differing = [code for code in range(256) if again[code] != code]
        assert differing == [0x7F]  # -0 decodes to 0, which encodes as +0 (0xFF)


class TestG711ALawBitExact:
    def test_encode_every_sample_like_audioop(self, audioop: ModuleType) -> None:
        assert g711.alaw_encode(EVERY_SAMPLE) == audioop.lin2alaw(EVERY_SAMPLE, 2)

    def test_decode_every_code_like_audioop(self, audioop: ModuleType) -> None:
        assert g711.alaw_decode(EVERY_CODE) == audioop.alaw2lin(EVERY_CODE, 2)

    def test_decode_then_encode_is_identity(self) -> None:
        assert g711.alaw_encode(g711.alaw_decode(EVERY_CODE)) == EVERY_CODE


class TestG711Framing:
    @pytest.mark.parametrize("encode", [g711.ulaw_encode, g711.alaw_encode])
    def test_odd_trailing_byte_is_ignored(self, encode: Transcode) -> None:
        pcm = np.array([1000, -1000, 5], dtype="<i2").tobytes()
        assert encode(pcm + b"\x7f") == encode(pcm)
        assert encode(b"\x01") == b""
        assert encode(b"") == b""

    @pytest.mark.parametrize("decode", [g711.ulaw_decode, g711.alaw_decode])
    def test_empty_decodes_to_empty(self, decode: Transcode) -> None:
        assert decode(b"") == b""

    def test_one_frame_sizes(self) -> None:
        silence = bytes(2 * g711.SAMPLES_PER_FRAME)
        assert len(g711.ulaw_encode(silence)) == g711.SAMPLES_PER_FRAME
        assert len(g711.alaw_decode(bytes(g711.SAMPLES_PER_FRAME))) == len(silence)
        assert g711.SAMPLES_PER_FRAME * 1000 // g711.SAMPLE_RATE == 20


class TestRfc3551Section6StaticPayloadTypes:
    def test_pcmu_is_0_and_pcma_is_8(self) -> None:
        pcmu = g711.codec_for_payload_type(0)
        pcma = g711.codec_for_payload_type(8)
        assert pcmu is not None
        assert pcma is not None
        assert (pcmu.name, pcmu.payload_type, pcmu.clock_rate) == ("PCMU", g711.PT_PCMU, 8000)
        assert (pcma.name, pcma.payload_type, pcma.clock_rate) == ("PCMA", g711.PT_PCMA, 8000)
        assert pcmu.encode is g711.ulaw_encode
        assert pcma.decode is g711.alaw_decode

    @pytest.mark.parametrize("payload_type", [3, 9, 18, 101, 127, -1])
    def test_other_payload_types_are_none(self, payload_type: int) -> None:
        assert g711.codec_for_payload_type(payload_type) is None

    def test_by_sdp_encoding_name(self) -> None:
        assert g711.codec_for_name("pcmu") is g711.PCMU
        assert g711.codec_for_name("PCMA") is g711.PCMA
        assert g711.codec_for_name("G722") is None


class TestG711AgainstFfmpegOnSippCapture:
    """SIPp's g711a.pcap: the A-law RTP payloads decode exactly as ffmpeg decodes them."""

    def test_alaw_payloads_decode_like_ffmpeg(
        self, sipp_share: Path, ffmpeg: str, tmp_path: Path
    ) -> None:
        capture = read_pcap(sipp_share / "g711a.pcap")
        assert capture.link_type == LINKTYPE_ETHERNET
        packets = [RtpPacket.parse(d.payload) for d in capture.datagrams]
        assert {p.payload_type for p in packets} == {g711.PT_PCMA}
        assert {len(p.payload) for p in packets} == {240}  # 30 ms packets
        alaw = b"".join(p.payload for p in packets)
        source = tmp_path / "in.alaw"
        target = tmp_path / "out.raw"
        source.write_bytes(alaw)
        subprocess.run(
            [
                *(ffmpeg, "-nostdin", "-loglevel", "error"),
                *("-f", "alaw", "-ar", "8000", "-ac", "1", "-i", str(source)),
                *("-f", "s16le", "-acodec", "pcm_s16le", str(target)),
            ],
            check=True,
            timeout=60,
        )
        expected = target.read_bytes()
        assert len(expected) == 2 * len(alaw)
        assert g711.alaw_decode(alaw) == expected
        # Per packet, as the media path does it.
        assert b"".join(g711.alaw_decode(p.payload) for p in packets) == expected
