#!/usr/bin/env python3
"""liger-serve in containers, as a user deploys it: the CPU image, docker/compose.yaml,
docker/compose.replicas.yaml (two replicas behind nginx) and the faults a deployment meets.

Run by tests/docker/run.sh, which makes the images first. Each check prints `ok` or `FAIL`;
the last line is `N passed, M failed`.

The compose files run as users get them, with one change each: every service is put on the
host's network, listening on its own loopback address (127.0.0.x), because test traffic on
these machines must stay on loopback; the health checks also run every 2 s instead of 15 s.
The rest (volumes, the prepare job, env files, images) is the files' own.
"""

import argparse
import copy
import os
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
from pathlib import Path

import yaml
from openai import OpenAI

ROOT = Path(__file__).resolve().parents[2]
SYSTEM = (
    "You are a helpful assistant. You answer questions about geography in one short sentence, "
    "and you never make up facts you are unsure of."
)
TURNS = ["What is the capital of France?", "And of Germany?", "And of Italy?"]

passed = 0
failed = 0


def check(name):
    def run(fn):
        global passed, failed
        t = time.time()
        try:
            fn()
            print(f"ok    {name} ({time.time() - t:.1f} s)", flush=True)
            passed += 1
        except Exception as e:  # noqa: BLE001: a failed check is reported, not raised
            print(f"FAIL  {name}: {e!r}", flush=True)
            traceback.print_exc(limit=3)
            failed += 1
        return fn

    return run


def sh(*cmd, check_rc=True, capture=True, timeout=900):
    r = subprocess.run(
        [str(c) for c in cmd], capture_output=capture, text=True, timeout=timeout
    )
    if check_rc and r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} -> {r.returncode}: {r.stderr[-2000:]}")
    return r.stdout.strip() if capture else ""


class Compose:
    """One compose file, turned into a host-network project under `work`."""

    def __init__(self, a, file, project, hosts, env):
        self.a, self.project = a, project
        doc = yaml.safe_load((ROOT / "docker" / file).read_text())
        for key in [k for k in doc if k.startswith("x-")]:
            del doc[key]
        for name in doc["services"]:
            # Services made from one YAML anchor are one object: give each its own copy.
            svc = doc["services"][name] = copy.deepcopy(doc["services"][name])
            svc.pop("ports", None)
            svc.pop("networks", None)
            svc.pop("build", None)  # the images are built beforehand
            svc["network_mode"] = "host"
            if "healthcheck" in svc:
                svc["healthcheck"].update(interval="2s", start_period="5m")
            environ = svc.setdefault("environment", {})
            environ.update(env.get(name, {}))
            if name in hosts:
                host, port = hosts[name]
                if name == "proxy":
                    environ["LIGER_PROXY_LISTEN"] = f"{host}:{port}"
                else:
                    environ.update(LIGER_HOST=host, LIGER_HEALTH_HOST=host, LIGER_PORT=str(port))
        self.path = Path(a.work) / f"{project}.yaml"
        self.path.write_text(yaml.safe_dump(doc, sort_keys=False))

    def __call__(self, *args, **kw):
        # Relative paths in the file (`..`, env_file) resolve against docker/, as for users.
        cmd = [*self.a.compose, "-f", self.path, "-p", self.project]
        cmd += ["--project-directory", ROOT / "docker", *args]
        return sh(*cmd, **kw)

    def container(self, service):
        cid = self("ps", "-q", service)
        if not cid:
            raise RuntimeError(f"no container for {service}")
        return cid.splitlines()[0]

    def down(self):
        self("down", "-v", "--remove-orphans", "-t", "30", check_rc=False)


def inspect(a, cid, fmt):
    return sh(a.docker, "inspect", "-f", fmt, cid)


def wait_healthy(a, cid, limit=600):
    t = time.time()
    while time.time() - t < limit:
        state = inspect(a, cid, "{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}")
        if state == "running healthy":
            return time.time() - t
        if state.startswith(("exited", "dead")):
            raise RuntimeError(f"{cid[:12]} {state}: {sh(a.docker, 'logs', '--tail', '20', cid, check_rc=False)}")
        time.sleep(0.5)
    raise RuntimeError(f"{cid[:12]} not healthy after {limit} s")


def client(base, cid=None):
    headers = {"X-Conversation-Id": cid} if cid else None
    return OpenAI(base_url=base + "/v1", api_key="none", default_headers=headers, max_retries=0, timeout=300)


def turn(base, cid, history, question):
    """One greedy chat turn through `base`: (answer, cached tokens, replica that answered)."""
    messages = [{"role": "system", "content": SYSTEM}, *history, {"role": "user", "content": question}]
    raw = client(base, cid).chat.completions.with_raw_response.create(
        model="liger", messages=messages, max_tokens=16, temperature=0
    )
    r = raw.parse()
    answer = r.choices[0].message.content
    history += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return answer, r.usage.prompt_tokens_details.cached_tokens, raw.headers.get("x-liger-upstream")


def metrics(base):
    with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def stream_then(base, max_tokens, action, **extra):
    """Streams a completion of `max_tokens` tokens, runs `action` once the first tokens have
    arrived, and returns (tokens received, finish reason, error raised by the stream)."""
    c = client(base)
    got, finish, error, fired = 0, None, None, False
    try:
        stream = c.completions.create(
            model="liger", prompt="Once upon a time", max_tokens=max_tokens, temperature=0,
            stream=True, extra_body={"ignore_eos": True}, **extra,
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            elif chunk.choices:
                got += 1  # one token per chunk until the last, which carries the finish reason
            if got == 5 and not fired:
                fired = True
                threading.Thread(target=action, daemon=True).start()
    except Exception as e:  # noqa: BLE001: the caller checks which error it was
        error = e
    return got, finish, error


def single(a, ref):
    """docker/compose.yaml: prepare job, server, restart, drain on SIGTERM."""
    host, port = "127.0.0.2", a.port
    base = f"http://{host}:{port}"
    env_convert = a.convert_env
    c = Compose(a, "compose.yaml", "ligertest-one", {"server": (host, port)}, {"convert": env_convert})
    c.down()
    try:
        server = None

        @check("compose.yaml: prepare job converts the fixture + committed adapter, server healthy")
        def _():
            nonlocal server
            c("up", "-d", capture=True)
            server = c.container("server")
            took = wait_healthy(a, server)
            conv = c.container("convert")
            assert inspect(a, conv, "{{.State.ExitCode}}") == "0"
            print(f"      healthy {took:.0f} s after `up` returned")

        if server is None:
            return

        @check("server runs as non-root (uid 10001), its log has no colour codes")
        def _():
            uid = sh(a.docker, "exec", server, "sh", "-c", "grep ^Uid: /proc/1/status")
            assert uid.split()[1:3] == ["10001", "10001"], uid
            r = subprocess.run([a.docker, "logs", server], capture_output=True, text=True)
            logs = r.stdout + r.stderr
            assert "listening" in logs and "\x1b[" not in logs, logs[-500:]

        @check("openai client: chat, streamed completion, /metrics")
        def _():
            cl = client(base)
            r = cl.chat.completions.create(
                model="liger", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0)
            assert r.choices[0].message.content and r.usage.completion_tokens > 0
            # Greedy and past the end-of-text token, so the stream always runs to its
            # length (sampled at temperature 1, it could end early and the check flaked).
            chunks = list(cl.completions.create(
                model="liger", prompt="The sky is", max_tokens=8, stream=True, temperature=0,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
            assert chunks[-1].usage.completion_tokens == 8, chunks[-1]
            assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length", chunks
            m = metrics(base)
            assert m["liger_generation_tokens_total"] >= 16, m
            assert m["liger_time_to_first_token_seconds_count"] >= 2, m

        @check("the state directory survives a container restart (turn 2 resumes: cached_tokens > 0)")
        def _():
            history = []
            ref["answers"] = [turn(base, "c1", history, TURNS[0])[0]]
            sh(a.docker, "restart", "-t", "30", server)
            wait_healthy(a, server)
            answer, cached, _ = turn(base, "c1", history, TURNS[1])
            assert cached > 0, cached
            ref["answers"].append(answer)
            answer, _, _ = turn(base, "c1", history, TURNS[2])
            ref["answers"].append(answer)
            print(f"      turn 2 after the restart: {cached} prompt tokens cached; answers {ref['answers']}")

        @check("docker stop drains: a 200-token stream in flight finishes, exit code 0")
        def _():
            got, finish, error = stream_then(
                base, 200, lambda: sh(a.docker, "stop", "-t", "30", server))
            assert error is None and got == 200 and finish == "length", (got, finish, error)
            deadline = time.time() + 60
            while inspect(a, server, "{{.State.Status}}") != "exited" and time.time() < deadline:
                time.sleep(0.2)
            assert inspect(a, server, "{{.State.ExitCode}}") == "0"
    finally:
        c.down()


def faults(a):
    """The image alone: a bounded drain and a state directory that is full."""
    host, port = "127.0.0.3", a.port
    base = f"http://{host}:{port}"
    # The model folder comes from a prepare run of its own, on a volume of this test.
    vol = "ligertest-faults-models"
    sh(a.docker, "volume", "rm", "-f", vol, check_rc=False)
    name = "ligertest-faults"
    sh(a.docker, "rm", "-f", name, check_rc=False)
    try:
        @check("prepare job alone (docker run liger-prepare on a volume)")
        def _():
            env = sum((["-e", f"{k}={v}"] for k, v in a.convert_env.items()), [])
            sh(a.docker, "run", "--rm", "--network", "host", "-v", f"{vol}:/models",
               "-v", f"{ROOT}:/repo:ro", "-v", f"{Path(a.gguf).parent}:/input:ro",
               *env, "--entrypoint", "liger-prepare", a.image)

        @check("a full state directory (1 MB tmpfs): every request 200, failures counted, no partial files")
        def _():
            sh(a.docker, "run", "-d", "--name", name, "--network", "host",
               "-e", f"LIGER_HOST={host}", "-e", f"LIGER_HEALTH_HOST={host}", "-e", f"LIGER_PORT={port}",
               "-e", "LIGER_SERVED_MODEL_NAME=liger", "-e", "LIGER_STATE_CACHE_DIR=/data/states",
               "-e", "LIGER_SHUTDOWN_GRACE_SECS=2",
               "--health-interval", "2s",
               "--mount", "type=tmpfs,destination=/data/states,tmpfs-size=1m,tmpfs-mode=1777",
               "-v", f"{vol}:/models:ro", a.image)
            wait_healthy(a, name)
            for q in TURNS:
                history = []
                turn(base, None, history, q)  # raises unless 200
            m = metrics(base)
            fails = m.get("liger_state_cache_write_failures_total", 0)
            assert fails >= 1, m
            left = sh(a.docker, "exec", name, "ls", "-A", "/data/states").split()
            assert not any("tmp" in f for f in left), left
            print(f"      {int(fails)} snapshot writes failed; /data/states holds {left}")

        @check("docker stop with a 2 s grace: the stream in flight ends with a clean error, exit 0")
        def _():
            stopped = {}

            def stop():
                t = time.time()
                sh(a.docker, "stop", "-t", "30", name)
                stopped["took"] = time.time() - t

            got, finish, error = stream_then(base, 3000, stop)
            deadline = time.time() + 60
            while "took" not in stopped and time.time() < deadline:
                time.sleep(0.2)
            assert error is not None and got < 3000, (got, finish, error)
            assert "shut" in str(error).lower(), error
            assert stopped.get("took", 99) < 15, stopped
            assert inspect(a, name, "{{.State.ExitCode}}") == "0"
            print(f"      {got} tokens, then {str(error)[:80]!r}; docker stop took {stopped['took']:.1f} s")
    finally:
        sh(a.docker, "rm", "-f", name, check_rc=False)
        sh(a.docker, "volume", "rm", "-f", vol, check_rc=False)


def replicas(a, ref):
    """docker/compose.replicas.yaml: affinity, failover from the shared snapshots."""
    port = a.port
    addrs = {"server-a": ("127.0.0.4", port), "server-b": ("127.0.0.5", port)}
    proxy = ("127.0.0.6", port)
    env = {"convert": a.convert_env, "proxy": {
        "LIGER_PROXY_UPSTREAMS": " ".join(f"{h}:{p}" for h, p in addrs.values())}}
    c = Compose(a, "compose.replicas.yaml", "ligertest-two", {**addrs, "proxy": proxy}, env)
    base = f"http://{proxy[0]}:{proxy[1]}"
    c.down()
    try:
        up = {}

        @check("compose.replicas.yaml: two replicas and nginx up, all healthy")
        def _():
            c("up", "-d")
            for s in ("server-a", "server-b", "proxy"):
                up[s] = c.container(s)
                wait_healthy(a, up[s])

        if len(up) < 3:
            return
        history, served = [], []

        @check("a conversation's turns land on one replica and hit its cache")
        def _():
            for q in TURNS[:2]:
                answer, cached, upstream = turn(base, "conversation-7", history, q)
                served.append((upstream, cached, answer))
            (u1, _, a1), (u2, c2, a2) = served
            assert u1 == u2 and u1, served
            assert c2 > 0, served
            assert [a1, a2] == ref["answers"][:2], (served, ref["answers"])
            print(f"      both turns on {u1}; turn 2: {c2} tokens cached")

        if len(served) < 2:
            return

        @check("its replica stopped: the other answers turn 3 from the shared snapshot, same answer")
        def _():
            owner = served[0][0]
            victim = next(s for s, (h, p) in addrs.items() if owner == f"{h}:{p}")
            results, stop_at = [], {}

            def load():
                i = 0
                while "end" not in stop_at:
                    t0 = time.time()
                    try:
                        r = client(base, f"load-{i}").chat.completions.create(
                            model="liger", messages=[{"role": "user", "content": f"Count to {i % 5 + 2}."}],
                            max_tokens=8, temperature=0)
                        results.append((t0, time.time(), "ok" if r.choices else "empty"))
                    except Exception as e:  # noqa: BLE001: counted below
                        results.append((t0, time.time(), repr(e)))
                    i += 1

            th = threading.Thread(target=load, daemon=True)
            th.start()
            time.sleep(2)
            stop_at["start"] = time.time()
            sh(a.docker, "stop", "-t", "30", up[victim])
            stop_at["done"] = time.time()
            answer, cached, tried = turn(base, "conversation-7", history, TURNS[2])
            # nginx lists every replica it tried ("stopped, other"): the last one answered.
            upstream = (tried or "").split(",")[-1].strip()
            time.sleep(2)
            stop_at["end"] = True
            th.join(timeout=120)
            assert upstream and upstream != owner, (upstream, owner)
            assert cached > 0, cached
            assert answer == ref["answers"][2], (answer, ref["answers"])
            # Requests that began after the stop must all succeed; those in flight during the
            # stop may fail, but only with an HTTP error (a clean answer), never a hang.
            late = [r for r in results if r[0] > stop_at["done"]]
            bad_late = [r for r in late if r[2] != "ok"]
            during = [r for r in results if r[0] <= stop_at["done"]]
            unclean = [r for r in during if r[2] != "ok" and "APIStatusError" not in r[2]
                       and "InternalServerError" not in r[2] and "APIError" not in r[2]]
            assert late and not bad_late, bad_late
            assert not unclean, unclean
            ok = sum(1 for r in results if r[2] == "ok")
            print(f"      turn 3: nginx tried {tried}; {cached} tokens cached from the shared volume; "
                  f"load: {ok}/{len(results)} ok ({len(late)} after the stop, all ok)")
    finally:
        c.down()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--docker", default="docker")
    p.add_argument("--compose", default="docker-compose", help="the compose command, split on blanks")
    p.add_argument("--image", default="liger:cpu")
    p.add_argument("--gguf", required=True, help="the SmolLM2 fixture (scripts/fetch-smollm2.sh)")
    p.add_argument("--work", required=True)
    p.add_argument("--port", type=int, default=28080)
    a = p.parse_args()
    a.compose = a.compose.split()
    args = (ROOT / "models/smollm2-135m-liger/convert.args").read_text().strip()
    a.convert_env = {
        "LIGER_CONVERT_FROM": f"/input/{Path(a.gguf).name}",
        "LIGER_CONVERT_ARGS": args,
        "LIGER_APPLY_ADAPTER": "/repo/models/smollm2-135m-liger",
    }
    os.environ["LIGER_INPUT_DIR"] = str(Path(a.gguf).parent)
    ref = {}
    single(a, ref)
    faults(a)
    if len(ref.get("answers", [])) == 3:
        replicas(a, ref)
    else:
        global failed
        print("FAIL  replicas: skipped, the single-server answers are missing")
        failed += 1
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
