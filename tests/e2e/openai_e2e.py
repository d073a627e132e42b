"""End-to-end checks of a running liger-serve through the official `openai` client.

Run by tests/e2e/openai_e2e.sh against the SmolLM2-135M fixture, once served as the imported
Transformer and once as its Liger-GLA conversion. Echo + logprobs on the golden token ids
must reproduce the independent reference logprobs (top_logit - logsumexp) within 1e-2.

Prints one line per check and a closing `N passed, M failed`; exits non-zero on failure.
"""

import argparse
import json
import sys
import traceback

import openai

from structured_checks import structured_checks

TOLERANCE = 1e-2
PASSED = []
FAILED = []


def check(name):
    """Runs the decorated function now as one named check."""

    def run(fn):
        try:
            fn()
            PASSED.append(name)
            print(f"ok    {name}", flush=True)
        except Exception as e:  # noqa: BLE001 - every failure is reported, none stops the run
            FAILED.append(name)
            print(f"FAIL  {name}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc(limit=3)
        return fn

    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--api-key", required=True)
    ap.add_argument("--golden", required=True)
    ap.add_argument("--reference", required=True, choices=["transformer", "liger_gla"])
    args = ap.parse_args()

    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=300)
    golden = json.load(open(args.golden))
    question = [{"role": "user", "content": "What is the capital of France?"}]
    tag = args.reference

    @check(f"{tag}: models.list names the served model")
    def _():
        ids = [m.id for m in client.models.list().data]
        assert ids == [args.model], ids

    chat_text = {}

    @check(f"{tag}: chat completion (greedy)")
    def _():
        r = client.chat.completions.create(model=args.model, messages=question, max_tokens=24, temperature=0)
        c = r.choices[0]
        assert c.message.role == "assistant"
        assert isinstance(c.message.content, str)
        assert c.finish_reason in ("stop", "length"), c.finish_reason
        assert r.usage.prompt_tokens == len(golden["cases"][0]["ids"]), r.usage
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        if tag == "transformer":
            assert "Paris" in c.message.content, c.message.content
        chat_text["greedy"] = c.message.content
        print(f"      answer: {c.message.content!r}")

    @check(f"{tag}: streamed chat equals the non-streamed answer")
    def _():
        stream = client.chat.completions.create(
            model=args.model, messages=question, max_tokens=24, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finishes and finishes[-1] in ("stop", "length"), finishes
        assert chunks[-1].choices == [] and chunks[-1].usage is not None, chunks[-1]
        assert text == chat_text["greedy"], (text, chat_text["greedy"])

    @check(f"{tag}: the next chat turn resumes from the cached state (cached_tokens)")
    def _():
        turn2 = question + [
            {"role": "assistant", "content": chat_text["greedy"]},
            {"role": "user", "content": "And of Germany?"},
        ]
        r = client.chat.completions.create(model=args.model, messages=turn2, max_tokens=8, temperature=0)
        cached = r.usage.prompt_tokens_details.cached_tokens
        first = len(golden["cases"][0]["ids"])
        # At least the first turn's prompt was read before; never the whole new prompt.
        assert first <= cached < r.usage.prompt_tokens, (cached, r.usage)
        print(f"      turn 2: {cached} of {r.usage.prompt_tokens} prompt tokens cached")

    @check(f"{tag}: chat logprobs")
    def _():
        r = client.chat.completions.create(
            model=args.model, messages=question, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3,
        )
        content = r.choices[0].logprobs.content
        assert len(content) == r.usage.completion_tokens
        for t in content:
            assert t.logprob <= 0 and len(t.top_logprobs) == 3 and isinstance(t.bytes, list)
            # Greedy: the chosen token is the most likely one.
            assert abs(t.logprob - t.top_logprobs[0].logprob) < 1e-5, t

    completion_text = {}

    @check(f"{tag}: text completion (greedy)")
    def _():
        r = client.completions.create(model=args.model, prompt="Once upon a time", max_tokens=12, temperature=0)
        assert r.choices[0].finish_reason in ("stop", "length")
        assert r.usage.completion_tokens <= 12
        completion_text["greedy"] = r.choices[0].text
        print(f"      text: {r.choices[0].text!r}")

    @check(f"{tag}: streamed completion equals the non-streamed text")
    def _():
        stream = client.completions.create(
            model=args.model, prompt="Once upon a time", max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == completion_text["greedy"], (text, completion_text["greedy"])
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 12, chunks[-1]

    @check(f"{tag}: seeded sampling reproduces, n=2 gives two choices")
    def _():
        kw = dict(model=args.model, prompt="The weather today", max_tokens=10, temperature=0.8, seed=1234)
        a = client.completions.create(**kw)
        b = client.completions.create(**kw)
        assert a.choices[0].text == b.choices[0].text
        two = client.completions.create(n=2, **kw)
        assert sorted(c.index for c in two.choices) == [0, 1]
        assert two.choices[0].text == a.choices[0].text, "choice 0 uses the request's seed"

    @check(f"{tag}: stop strings are not emitted")
    def _():
        base = client.completions.create(model=args.model, prompt="Once upon a time", max_tokens=12, temperature=0)
        words = base.choices[0].text.split()
        assert len(words) > 2, base.choices[0].text
        stop = " " + words[2]
        r = client.completions.create(model=args.model, prompt="Once upon a time", max_tokens=12, temperature=0, stop=[stop])
        assert stop not in r.choices[0].text and r.choices[0].finish_reason == "stop", r.choices[0]
        assert base.choices[0].text.startswith(r.choices[0].text)

    for case in golden["cases"]:
        ids = case["ids"]

        @check(f"{tag}: the tokenizer encodes golden case {case['name']} to its ids")
        def _(case=case, ids=ids):
            r = client.completions.create(
                model=args.model, prompt=case["text"], max_tokens=0, echo=True, logprobs=0,
                extra_body={"return_tokens_as_token_ids": True},
            )
            got = [int(t.split(":")[1]) for t in r.choices[0].logprobs.tokens]
            assert got == ids, (got[:10], ids[:10])
            assert r.choices[0].text == case["text"]

        @check(f"{tag}: echo logprobs of {case['name']} match the golden {tag} reference")
        def _(case=case, ids=ids):
            r = client.completions.create(
                model=args.model, prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=5,
                extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True},
            )
            lp = r.choices[0].logprobs
            assert len(lp.tokens) == len(ids) + 1
            assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
            worst = 0.0
            for row in case[tag]:
                pos = row["pos"]
                lse = row["logsumexp"]
                want = {i: l - lse for i, l in zip(row["top_ids"], row["top_logits"])}
                # Entry pos+1 holds the distribution after consuming tokens 0..=pos.
                top = {int(k.split(":")[1]): v for k, v in lp.top_logprobs[pos + 1].items()}
                best_id = row["top_ids"][0]
                assert best_id in top, (pos, best_id, top)
                for tid, v in top.items():
                    assert tid in want, f"pos {pos}: token {tid} is not in the reference top 20"
                    worst = max(worst, abs(v - want[tid]))
                if pos + 1 < len(ids) and ids[pos + 1] in want:
                    worst = max(worst, abs(lp.token_logprobs[pos + 1] - want[ids[pos + 1]]))
            print(f"      max |logprob - golden| = {worst:.2e} over {len(case[tag])} positions")
            assert worst < TOLERANCE, worst

    @check(f"{tag}: errors come back as the client's typed exceptions")
    def _():
        try:
            client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
            raise AssertionError("unknown model accepted")
        except openai.NotFoundError:
            pass
        try:
            client.completions.create(model=args.model, prompt="x", max_tokens=1, temperature=-1)
            raise AssertionError("negative temperature accepted")
        except openai.BadRequestError as e:
            assert e.body["param"] == "temperature", e.body
        bad = openai.OpenAI(base_url=args.base_url, api_key="wrong-key", max_retries=0)
        try:
            bad.models.list()
            raise AssertionError("wrong API key accepted")
        except openai.AuthenticationError:
            pass

    structured_checks(check, client, args.model, tag)

    print(f"{len(PASSED)} passed, {len(FAILED)} failed")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
