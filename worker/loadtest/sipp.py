"""The bulk callers: one SIPp process (Debian ``sip-tester``) that ramps to the load, its scenario,
the RTP it plays, and its figures read back (calls now, successes, failures, INVITE→200 times).

Each call offers PCMU + telephone-event, and once answered plays one RTP stream from a capture
written for the run (``write_capture``): speech-like µ-law in 20 ms packets for the whole call,
with RFC 4733 key presses in the same stream (same SSRC, sequence and source port). SIPp's own
``rtp_stream`` cannot carry DTMF, and DTMF played from another capture would leave from another
port, which the worker ignores once it has latched the audio's source. SIPp sends the capture's
RTP headers unchanged, at the capture's times. Playing a capture needs a raw socket: root, or
``CAP_NET_RAW`` on ``sipp``.
"""

from __future__ import annotations

import csv
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from media.dtmf import event_code
from media.g711 import ulaw_encode

FRAME_S = 0.020
SAMPLES = 160
PT_PCMU = 0
PT_EVENT = 101
DIGITS = "159"
"""Pressed by every bulk call, ``DIGIT_START_S`` after the answer, ``DIGIT_GAP_S`` apart."""
DIGIT_START_S = 1.5
DIGIT_GAP_S = 0.5
DIGIT_FRAMES = 5  # 100 ms per key, then the end packet three times (RFC 4733 §2.5.1.4)
SSRC = 0x4C4F4144

SCENARIO = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<!-- aispinner-worker loadtest: a caller that plays {capture} (speech-like PCMU with RFC 4733
     digits {digits}) right after the ACK, keeps the call -d ms, then hangs up. -->
<scenario name="aispinner loadtest caller">
  <send retrans="500">
    <![CDATA[
      INVITE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: <sip:loadtest-bulk-[call_number]@[local_ip]:[local_port]>;tag=[pid]lt[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>
      Call-ID: [call_id]
      CSeq: 1 INVITE
      Contact: <sip:loadtest@[local_ip]:[local_port]>
      Max-Forwards: 70
      User-Agent: aispinner-loadtest-sipp
      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=loadtest 53655765 2353687637 IN IP[local_ip_type] [local_ip]
      s=-
      c=IN IP[media_ip_type] [media_ip]
      t=0 0
      m=audio [auto_media_port] RTP/AVP 0 101
      a=rtpmap:0 PCMU/8000
      a=rtpmap:101 telephone-event/8000
      a=fmtp:101 0-16
      a=ptime:20
    ]]>
  </send>
  <recv response="100" optional="true"/>
  <recv response="180" optional="true"/>
  <recv response="183" optional="true"/>
  <recv response="200" rtd="true"/>
  <send>
    <![CDATA[
      ACK sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: <sip:loadtest-bulk-[call_number]@[local_ip]:[local_port]>;tag=[pid]lt[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 1 ACK
      Contact: <sip:loadtest@[local_ip]:[local_port]>
      Max-Forwards: 70
      Content-Length: 0
    ]]>
  </send>
  <nop><action><exec play_pcap_audio="{capture}"/></action></nop>
  <pause/>
  <send retrans="500">
    <![CDATA[
      BYE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: <sip:loadtest-bulk-[call_number]@[local_ip]:[local_port]>;tag=[pid]lt[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 2 BYE
      Max-Forwards: 70
      Content-Length: 0
    ]]>
  </send>
  <recv response="200" crlf="true"/>
  <ResponseTimeRepartition value="10, 20, 50, 100, 200, 500, 1000, 2000"/>
</scenario>
"""


def write_scenario(path: Path, capture: Path) -> None:
    path.write_text(SCENARIO.format(capture=capture, digits=" ".join(DIGITS)), encoding="utf-8")


def prepare(folder: Path, capture: Path, seconds: float) -> None:
    """SIPp's folder with the scenario, and the capture it plays (``seconds`` long)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_capture(capture, seconds)
    write_scenario(folder / "scenario.xml", capture)


def speech_like(seconds: float, rate: int = 8000) -> bytes:
    """A voiced sound (140 Hz and harmonics) in syllables with pauses, 16-bit PCM."""
    t = np.arange(round(seconds * rate)) / rate
    voice = sum(np.sin(2 * math.pi * k * 140 * t) / k for k in range(1, 6))
    syllables = 0.5 + 0.5 * np.sin(2 * math.pi * 3 * t)
    phrases = np.sin(2 * math.pi * 0.4 * t) > -0.3
    pcm: np.ndarray = 5000 * voice * syllables * phrases
    return np.round(pcm).astype("<i2").tobytes()


def rtp_packets(seconds: float) -> list[tuple[float, bytes]]:
    """The stream a bulk caller plays: (send time from the answer, RTP packet), 20 ms apart;
    ``DIGITS`` replace the audio while they are pressed."""
    loop = ulaw_encode(speech_like(4.0))
    doubled = loop + loop
    frames = round(seconds / FRAME_S)
    digit_frames: dict[int, tuple[int, int]] = {}  # frame -> (event code, frame within the key)
    for i, digit in enumerate(DIGITS):
        first = round((DIGIT_START_S + i * DIGIT_GAP_S) / FRAME_S)
        for k in range(DIGIT_FRAMES + 3):
            digit_frames[first + k] = (event_code(digit), k)
    packets: list[tuple[float, bytes]] = []
    for n in range(frames):
        timestamp = (n * SAMPLES) & 0xFFFFFFFF
        sequence = n & 0xFFFF
        key = digit_frames.get(n)
        if key is None:
            offset = (n * SAMPLES) % len(loop)
            payload = doubled[offset : offset + SAMPLES]
            header = struct.pack("!BBHII", 0x80, PT_PCMU, sequence, timestamp, SSRC)
        else:
            code, k = key
            start = n - k  # the key's first frame: every packet of a key carries its timestamp
            timestamp = (start * SAMPLES) & 0xFFFFFFFF
            end = k >= DIGIT_FRAMES
            duration = SAMPLES * min(k + 1, DIGIT_FRAMES)
            marker = 0x80 if k == 0 else 0
            payload = struct.pack("!BBH", code, (0x80 if end else 0) | 10, duration)
            header = struct.pack("!BBHII", 0x80, marker | PT_EVENT, sequence, timestamp, SSRC)
        packets.append((n * FRAME_S, header + payload))
    return packets


def write_capture(path: Path, seconds: float) -> None:
    """A classic pcap (Ethernet, IPv4, UDP) of ``rtp_packets(seconds)``; SIPp rewrites the
    addresses and ports when it plays it."""
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]
    for at, rtp in rtp_packets(seconds):
        udp = struct.pack("!HHHH", 6000, 7000, 8 + len(rtp), 0) + rtp
        ip = struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, b"\x7f\0\0\1", b"\x7f\0\0\1"
        )
        frame = b"\0" * 12 + b"\x08\x00" + ip + udp
        seconds_part = int(at)
        micros = round((at - seconds_part) * 1e6)
        out.append(struct.pack("<IIII", seconds_part, micros, len(frame), len(frame)) + frame)
    path.write_bytes(b"".join(out))


def digits_pressed(call_seconds: float) -> int:
    """How many of ``DIGITS`` a call of this length presses."""
    return sum(
        1
        for i in range(len(DIGITS))
        if DIGIT_START_S + i * DIGIT_GAP_S + (DIGIT_FRAMES + 3) * FRAME_S < call_seconds
    )


def command(
    sipp: str,
    target: str,
    workdir: Path,
    *,
    local_ip: str,
    number: str,
    calls: int,
    rate: float,
    call_ms: int,
    ports: tuple[int, int, int],
    timeout_s: int,
) -> list[str]:
    """SIPp's command line: ``ports`` are its SIP, media and control ports."""
    sip_port, media_port, control_port = ports
    return [
        sipp, target,
        "-sf", str(workdir / "scenario.xml"),
        "-s", number,
        "-i", local_ip, "-mi", local_ip, "-ci", "127.0.0.1", "-cp", str(control_port),
        "-bind_local", "-nostdin",
        "-p", str(sip_port), "-mp", str(media_port),
        "-r", f"{rate:g}", "-rp", "1000", "-l", str(calls), "-m", str(calls),
        "-d", str(call_ms),
        "-timeout", f"{timeout_s}s", "-timeout_error",
        "-trace_err", "-error_file", str(workdir / "errors.log"),
        "-trace_stat", "-stf", str(workdir / "stats.csv"), "-fd", "1",
        "-trace_rtt", "-rtt_freq", "1",
    ]  # fmt: skip


@dataclass(frozen=True, slots=True)
class SippNow:
    """The last row of SIPp's ``-trace_stat`` file (written every second)."""

    current: int
    successful: int
    failed: int
    started: int


def read_stats(path: Path) -> SippNow | None:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    rows = [row for row in csv.reader(text.splitlines(), delimiter=";") if row]
    if len(rows) < 2:
        return None
    row = dict(zip(rows[0], rows[-1], strict=False))
    try:
        return SippNow(
            current=int(row["CurrentCall"]),
            successful=int(row["SuccessfulCall(C)"]),
            failed=int(row["FailedCall(C)"]),
            started=int(row["OutgoingCall(C)"]),
        )
    except (KeyError, ValueError):
        return None


def response_times_ms(workdir: Path) -> list[float]:
    """Every INVITE's response time (the scenario's one rtd) from SIPp's ``-trace_rtt`` files:
    lines of ``date_ms;response_time_ms;rtd_no``."""
    times: list[float] = []
    for path in sorted(workdir.glob("*_rtt.csv")):
        for line in path.read_text(errors="replace").splitlines()[1:]:
            parts = line.split(";")
            if len(parts) >= 3 and parts[2].strip() == "1":
                try:
                    times.append(float(parts[1]))
                except ValueError:
                    continue
    return times
