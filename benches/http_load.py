#!/usr/bin/env python3
"""HTTP load benchmark for any OpenAI-compatible server (liger-serve, llama.cpp's
llama-server, vLLM): N concurrent streaming clients, each sending distinct prompts (so no
server can answer from a prefix cache), measuring aggregate decode tokens/s, time to first
token and inter-token latency (p50/p99). "tokens/s (wall)" counts completion tokens over the
whole run, prompt reading included; "decode tokens/s" adds up the streams' own decode rates
(tokens after the first over the time they took), the figure llama.cpp's comparisons use.

    python benches/http_load.py --base-url http://127.0.0.1:8080/v1 --model NAME \
        --concurrency 1,8,32 --prompt-tokens 256,4096 --max-tokens 64 [--json out.json]
    python benches/http_load.py --server liger-serve http://127.0.0.1:8080/v1 liger \
        --server llama-server http://127.0.0.1:8081/v1 smollm2 [same options]

With several `--server`s, the servers take turns round by round: a round is `concurrency`
requests at once, a level as many rounds as make `--min-requests` (each round's prompts are
the same for every server, and the server that goes first moves on each round), so that a
machine whose speed drifts slows them alike instead of whichever ran last; `--json` then
holds every server's rows. A level's wall time is the sum of its rounds'.

Every level runs at least `--min-requests` requests (8): a stream runs several in a row when
there are fewer streams, so that one stream's TTFT p50 and ITL p99 are not one request's.

Prompts are slices of English text (data/pydoc-train.txt) sized to about the asked token
count with the server's own tokenizer count read back from `usage`; every request of a run
starts at a different offset. Needs the `openai` package.
"""

import argparse
import asyncio
import json
import pathlib
import statistics
import sys
import time

from openai import APIConnectionError, AsyncOpenAI

ROOT = pathlib.Path(__file__).resolve().parent.parent
TEXT = (ROOT / "data" / "pydoc-train.txt").read_text()


def percentile(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def prompt_at(index, chars):
    """A distinct slice of the corpus (wrapping around), about `chars` characters."""
    start = (index * 7919) % max(1, len(TEXT) - chars)
    s = TEXT[start : start + chars]
    while len(s) < chars:
        s += "\n" + TEXT[: chars - len(s)]
    return s


# A connection the server closed between two requests (llama-server's HTTP library ends a
# keep-alive connection after a few requests) fails the next request before the server has
# read it: that request is sent again, timed from the new attempt. Any other error, or one
# that repeats, ends the run.
STALE_CONNECTION_RETRIES = 2


async def one_request(client, model, prompt, max_tokens):
    for attempt in range(STALE_CONNECTION_RETRIES + 1):
        t0 = time.perf_counter()
        try:
            stream = await client.completions.create(
                model=model,
                prompt=prompt,
                max_tokens=max_tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            break
        except APIConnectionError as e:
            if attempt == STALE_CONNECTION_RETRIES or "disconnected" not in repr(e.__cause__):
                raise
    first = None
    stamps = []
    usage = None
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.choices and chunk.choices[0].text:
            if first is None:
                first = now - t0
            stamps.append(now)
        if getattr(chunk, "usage", None):
            usage = chunk.usage
    itl = [b - a for a, b in zip(stamps, stamps[1:])]
    tokens = usage.completion_tokens if usage else len(stamps)
    ptoks = usage.prompt_tokens if usage else None
    # This stream's decode rate: tokens after the first over the time they took.
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else None
    return {
        "ttft": first,
        "itl": itl,
        "tokens": tokens,
        "prompt_tokens": ptoks,
        "rate": rate,
        "resent": attempt,
    }


async def run_round(client, model, concurrency, chars, max_tokens, first_index):
    """`concurrency` requests at once, prompts `first_index + 1` on: their results and the
    round's wall time."""
    t0 = time.perf_counter()
    results = await asyncio.gather(
        *(
            one_request(client, model, prompt_at(first_index + 1 + i, chars), max_tokens)
            for i in range(concurrency)
        )
    )
    return list(results), time.perf_counter() - t0


def summarize(results, wall, concurrency):
    """A level's row from its requests' results and its rounds' wall time."""
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    itl = [x for r in results for x in r["itl"]]
    tokens = sum(r["tokens"] for r in results)
    ptoks = [r["prompt_tokens"] for r in results if r["prompt_tokens"]]
    rates = [r["rate"] for r in results if r["rate"]]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "prompt_tokens": round(statistics.mean(ptoks)) if ptoks else None,
        "completion_tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        # Aggregate decode throughput: the streams decode side by side, so their rates add.
        "decode_tokens_per_s": statistics.mean(rates) * concurrency if rates else None,
        "ttft_p50_ms": percentile(ttft, 50) * 1e3,
        "ttft_p99_ms": percentile(ttft, 99) * 1e3,
        "itl_p50_ms": percentile(itl, 50) * 1e3,
        "itl_p99_ms": percentile(itl, 99) * 1e3,
        "resent": sum(r["resent"] for r in results),
    }


def report(row):
    print(
        f"{row['label']}: prompt ~{row['prompt_tokens']} x {row['concurrency']} streams: "
        f"{row['tokens_per_s']:.1f} tok/s, TTFT p50 {row['ttft_p50_ms']:.0f} ms "
        f"p99 {row['ttft_p99_ms']:.0f} ms, ITL p50 {row['itl_p50_ms']:.1f} ms "
        f"p99 {row['itl_p99_ms']:.1f} ms",
        file=sys.stderr,
        flush=True,
    )


async def calibrate(client, model, want_tokens):
    """Characters per token of this corpus under the server's tokenizer."""
    sample = prompt_at(0, 4000)
    r = await client.completions.create(model=model, prompt=sample, max_tokens=1, temperature=0)
    per_token = len(sample) / max(1, r.usage.prompt_tokens)
    return int(want_tokens * per_token)


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url")
    ap.add_argument("--model")
    ap.add_argument("--label", default="server")
    ap.add_argument(
        "--server",
        nargs=3,
        action="append",
        metavar=("LABEL", "BASE_URL", "MODEL"),
        help="a server to load (repeatable; they take turns round by round)",
    )
    ap.add_argument("--api-key", default="none")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--prompt-tokens", default="256,4096")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument(
        "--rounds", type=int, default=1, help="rounds per level (each: one request per client)"
    )
    ap.add_argument(
        "--min-requests",
        type=int,
        default=8,
        help="at least this many requests per level (low concurrencies run more rounds): one "
        "stream's single request gives one TTFT and 63 intervals, whose p99 is their "
        "second-largest",
    )
    ap.add_argument("--json")
    a = ap.parse_args()
    servers = list(a.server or [])
    if a.base_url or a.model:
        if not (a.base_url and a.model):
            ap.error("--base-url and --model go together")
        servers.insert(0, (a.label, a.base_url, a.model))
    if not servers:
        ap.error("name a server: --base-url and --model, or --server")
    clients = [
        (label, AsyncOpenAI(base_url=url, api_key=a.api_key, timeout=3600, max_retries=0), model)
        for label, url, model in servers
    ]
    rows = []
    index = 0
    turn = 0
    for ptoks in [int(x) for x in a.prompt_tokens.split(",")]:
        # Every server reads the same prompts, sized with the first one's tokenizer; the
        # others read the calibration prompt too, so none starts a level cold.
        chars = [await calibrate(client, model, ptoks) for _, client, model in clients][0]
        for c in [int(x) for x in a.concurrency.split(",")]:
            rounds = max(a.rounds, -(-a.min_requests // c))
            done = {label: ([], 0.0) for label, _, _ in clients}
            # Servers take turns round by round, the first moving on each round: a level
            # of one stream is 8 requests of ~0.7 s, and the machine's speed shifts within
            # seconds (one server's lone-stream step measured 10.5-11 ms for some requests
            # and 13-14 ms for the next ones), which, level by level, one server met and
            # the other did not.
            for r in range(rounds):
                order = clients[turn % len(clients) :] + clients[: turn % len(clients)]
                turn += 1
                for label, client, model in order:
                    results, wall = await run_round(
                        client, model, c, chars, a.max_tokens, index + r * c
                    )
                    done[label] = (done[label][0] + results, done[label][1] + wall)
            for label, _, _ in clients:
                row = summarize(*done[label], c)
                row["label"] = label
                row["target_prompt_tokens"] = ptoks
                rows.append(row)
                report(row)
            index += 1000
    rows.sort(key=lambda r: [s[0] for s in servers].index(r["label"]))
    print(
        "| server | prompt tokens | streams | tokens/s (wall) | decode tokens/s | TTFT p50 | "
        "TTFT p99 | ITL p50 | ITL p99 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        decode = r["decode_tokens_per_s"]
        print(
            f"| {r['label']} | {r['prompt_tokens']} | {r['concurrency']} | {r['tokens_per_s']:.1f} | "
            f"{'-' if decode is None else f'{decode:.1f}'} | "
            f"{r['ttft_p50_ms']:.0f} ms | {r['ttft_p99_ms']:.0f} ms | {r['itl_p50_ms']:.1f} ms | "
            f"{r['itl_p99_ms']:.1f} ms |"
        )
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
