"""How fast a 429 is answered under a flood, measured with wrk (issue 11).

    python bench/refusal_latency.py --bundle bundles/default

One service (`encoder serve`, defaults). wrk (C, one event loop per thread) floods it with 1,000-text
/embed requests: `--connections` connections, each waiting a random 0-2x `--interval-ms` after each
answer (bench/wrk_paced.lua), which offers about connections / interval requests per second, far beyond
what the service can serve. Most are refused with 429; the few admitted take seconds, longer than
wrk's --timeout of 1 s, so they leave wrk's latency histogram (counted as timeouts), and the
percentiles are those of the answers within 1 s: the refusals'. Target (issue 11): p99 in single-digit
milliseconds.

The Python open-loop client of bench/fairness.py measures the same thing with its own costs added
(it also reads the admitted requests' 4 MB answers on its one event loop). Both share the 2 cores with
the service. Prints one JSON line per run and, as its last line, all runs as one JSON object.
"""

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

from loadgen import make_texts

from service.process import ServiceProcess

SCRIPT = Path(__file__).with_name("wrk_paced.lua")
BIG_TEXTS = 1000


def flood(url: str, body: Path, connections: int, interval_ms: int, seconds: int) -> dict[str, object]:
    command = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--timeout", "1s", "-s", str(SCRIPT)]
    environment = {**os.environ, "INTERVAL_MS": str(interval_ms)}
    output = subprocess.run(
        [*command, f"{url}/embed", "--", str(body)],
        capture_output=True,
        text=True,
        check=True,
        env=environment,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=Path("bundles/default"))
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--interval-ms", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument(
        "--setting", action="append", default=[], metavar="NAME=VALUE", help="a service setting, repeatable"
    )
    args = parser.parse_args()
    settings = dict(setting.split("=", 1) for setting in args.setting)
    runs = []
    with tempfile.TemporaryDirectory() as scratch, ServiceProcess(args.bundle, **settings) as service:
        body = Path(scratch) / "body.json"
        body.write_text(json.dumps({"inputs": make_texts(BIG_TEXTS, seed=11)}))
        for _ in range(args.runs):
            result = flood(service.base_url, body, args.connections, args.interval_ms, args.seconds)
            print(json.dumps(result), flush=True)
            runs.append(result)
    print(
        json.dumps(
            {
                "connections": args.connections,
                "interval_ms": args.interval_ms,
                "settings": settings,
                "runs": runs,
            }
        )
    )


if __name__ == "__main__":
    main()
