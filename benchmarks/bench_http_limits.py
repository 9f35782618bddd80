"""What the HTTP side costs the process it shares with the frontend's datapath.

1. Event-loop time of detokenization and stop matching (TextStream) per request: 8000 tokens that are
   bytes of invalid UTF-8 (what a confused model emits), and 8000 ordinary tokens, with and without
   stop strings. `--before REV` also runs the TextStream of an older commit (read with `git show`),
   side by side.
2. `--serve`: a `resilient-moe serve` (tiny model) receives a 64 MB chunked upload; the table gives
   the serve process's memory before and at its peak, the answer, and /health's worst latency meanwhile.

    python benchmarks/bench_http_limits.py [--before c363910] [--serve] [--json out.json]
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from resilient_moe.engine.tokenizer import TextTokenizer  # noqa: E402
from resilient_moe.model.tiny import make_tiny_model  # noqa: E402
from resilient_moe.server.textstream import TextStream  # noqa: E402

TOKENS = 8000


def byte_level_id(tokenizer: TextTokenizer, byte: int) -> int:
    """The id of the byte-level BPE token that stands for one raw byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    extra = [b for b in range(256) if b not in printable]
    char = chr(byte) if byte in printable else chr(256 + extra.index(byte))
    return tokenizer._tok.token_to_id(char)


def old_text_stream(rev: str):
    """The TextStream class as it was at `rev` (in server/api.py then)."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:resilient_moe/server/api.py"],
                            capture_output=True, text=True, check=True).stdout
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "TextStream")
    namespace: dict = {}
    exec(compile("from __future__ import annotations\n" + ast.get_source_segment(source, node), rev, "exec"), namespace)
    return namespace["TextStream"]


def loop_time(cls, tokenizer, ids: list[int], stops: list[str]) -> float:
    stream = cls(tokenizer, stops)
    began = time.perf_counter()
    for token in ids:
        stream.add(token)
    stream.flush()
    return time.perf_counter() - began


def bench_text(model_dir: Path, before: str | None) -> list[dict]:
    tokenizer = TextTokenizer.from_dir(model_dir)
    invalid = [byte_level_id(tokenizer, 0x80)] * TOKENS  # a continuation byte with nothing to continue
    sentence = tokenizer.encode("the experts answer every request and the workers keep going ", False)
    ordinary = (sentence * TOKENS)[:TOKENS]
    classes = [("now", TextStream)] + ([(before, old_text_stream(before))] if before else [])
    rows = []
    for name, ids in (("invalid UTF-8 bytes", invalid), ("ordinary text", ordinary)):
        for stops in ([], ["STOP", "\n\nUser:"]):
            row = {"tokens": f"{TOKENS} {name}", "stops": len(stops)}
            for label, cls in classes:
                row[label] = loop_time(cls, tokenizer, ids, stops)
            rows.append(row)
    return rows


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def bench_upload(model_dir: Path, workdir: Path) -> dict:
    import httpx

    config = workdir / "deployment.yaml"
    config.write_text("attention_workers: 1\nexpert_workers: 2\nheartbeat_timeout_s: 5.0\n")
    proc = subprocess.Popen([sys.executable, "-m", "resilient_moe.cli", "serve", "--model", str(model_dir), "--port",
                             "0", "--config", str(config), "--log-dir", str(workdir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = None
        for line in proc.stdout:
            url = url or (m.group(1) if (m := re.search(r"OpenAI API\s+(http://\S+?)/v1", line)) else None)
            if line.startswith("press Ctrl-C"):
                break
        port = int(url.rsplit(":", 1)[1])
        before, peak, health = rss_mb(proc.pid), [0.0], []
        stop = threading.Event()

        def watch() -> None:
            with httpx.Client(timeout=10) as http:
                while not stop.is_set():
                    began = time.perf_counter()
                    ok = http.get(f"{url}/health").status_code == 200
                    health.append((ok, time.perf_counter() - began))
                    peak[0] = max(peak[0], rss_mb(proc.pid))
                    stop.wait(0.05)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        began = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            chunk = b"%x\r\n%s\r\n" % (1 << 20, b"7" * (1 << 20))
            sent = 0
            try:
                for _ in range(64):
                    sock.sendall(chunk)
                    sent += 1
                    if select.select([sock], [], [], 0)[0]:
                        break
            except OSError:
                pass
            answer = sock.recv(65536)
        elapsed = time.perf_counter() - began
        time.sleep(1.0)
        stop.set()
        watcher.join(10)
        return {"answer": answer.split(b"\r\n", 1)[0].decode(), "MB sent": sent, "seconds": elapsed,
                "rss before MB": before, "rss peak MB": peak[0], "health ok": sum(ok for ok, _ in health),
                "health failed": sum(not ok for ok, _ in health), "health worst ms": 1000 * max(t for _, t in health)}
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", metavar="REV", help="also time the TextStream of this commit")
    parser.add_argument("--serve", action="store_true", help="also send a 64 MB chunked upload to a live server")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "tiny", "mixtral", seed=0)
        text = bench_text(model, args.before)
        labels = ["now"] + ([args.before] if args.before else [])
        print(f"{'tokens':<30} {'stops':>5} " + " ".join(f"{label + ' s':>12}" for label in labels))
        for row in text:
            print(f"{row['tokens']:<30} {row['stops']:>5} " + " ".join(f"{row[label]:>12.4f}" for label in labels))
        result = {"text_stream": text}
        if args.serve:
            upload = bench_upload(model, Path(tmp))
            print()
            for key, value in upload.items():
                print(f"{key:<16} {value:.1f}" if isinstance(value, float) else f"{key:<16} {value}")
            result["upload_64mb"] = upload
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
