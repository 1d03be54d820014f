"""`doit verify`: rebuild every variant the lock records -- in a fresh, empty build directory that
shares nothing with build/store -- and compare each output's sha256 with the lock (DVC's
`dvc.lock` idea: the lock is the record a rebuild is checked against).

On a mismatch the report says, per file, what the lock holds and what the rebuild made; per
tensor, what differs (compiler.ggufdiff) against a local copy of the recorded bytes when one is in
build/store; whether the planned step keys still equal the recorded ones (a changed recipe, conf or
stage code); whether the source files still hash as recorded; and whether the toolchain fingerprint
differs (another compiler or CPU architecture can change k-quant bytes: suspect the machine, not
the recipe).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import ggufdiff
from .errors import ForgeError
from .paths import ROOT, alloys_dir, build_dir, lock_path
from .toolchain import fingerprint_parts

# The steps whose keys decide an output's bytes (gate, smoke and receipt keys may change without
# touching a byte, so they say nothing about a mismatch).
_SHAPING_ROLES = ("source", "convert", "imatrix", "quantize", "projector")
# Exit status of a verify whose every variant's lock was written on another platform class.
NO_REFERENCE = 3


def selected(lock: dict, cli_vars: dict) -> list[str]:
    """Lock variant ids matching `only=` (variant ids), `alloy=` and `tier=`."""
    if not lock["variants"]:
        raise ForgeError("the lock records no variants: build and lock them first with `doit`", where=str(lock_path()))
    unknown = sorted(set(cli_vars) - {"only", "alloy", "tier"})
    if unknown:
        raise ForgeError("verify chooses locked variants by only=, alloy= and tier= alone", where="doit verify",
                         found=unknown, allowed=["only=<variant ids>", "alloy=<names>", "tier=<tier>"])
    ids = []
    only = set(cli_vars["only"].split(",")) if cli_vars.get("only") else None
    if only and only - set(lock["variants"]):
        raise ForgeError("no such variant in the lock", where=f"only={cli_vars['only']}",
                         found=sorted(only - set(lock["variants"])), allowed=sorted(lock["variants"]))
    from .alloy import ALLOY_SUFFIX

    for vid, entry in lock["variants"].items():
        if only is not None and vid not in only:
            continue
        if not (alloys_dir() / f"{entry['alloy']}{ALLOY_SUFFIX}").is_file():
            # Deleted since it was locked: there is no recipe to rebuild it from (the next doit drops it).
            print(f"verify: {vid} skipped: its alloy {entry['alloy']} is no longer in {alloys_dir()} (the next "
                  f"`doit` removes its lock entry)", flush=True)
            continue
        if "alloy" in cli_vars and entry["alloy"] not in cli_vars["alloy"].split(","):
            continue
        if "tier" in cli_vars and entry["tier"] != cli_vars["tier"]:
            continue
        ids.append(vid)
    if not ids:
        raise ForgeError("no variant in the lock matches", where=str(lock_path()),
                         found=cli_vars, allowed=sorted(lock["variants"]))
    return ids


def _manifest(store: Path, kind: str, key: str) -> dict | None:
    try:
        return json.loads((store / kind / key / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def _reference(store: Path, kind: str, key: str, sha: str) -> tuple[Path | None, str]:
    """A local file to compare tensors against: one in build/store whose bytes are the lock's, or
    else the local build of the same key."""
    for manifest in sorted((store / kind).glob("*/manifest.json")) if (store / kind).is_dir() else []:
        try:
            files = json.loads(manifest.read_text())["files"]
        except (OSError, ValueError, KeyError):
            continue
        if files and files[0]["sha256"] == sha:
            return manifest.parent / files[0]["filename"], "the recorded bytes (found in build/store)"
    m = _manifest(store, kind, key)
    if m and m.get("files"):
        return store / kind / key / m["files"][0]["filename"], f"the local build of the same key (sha256 {m['files'][0]['sha256'][:12]})"
    return None, "no local copy of the recorded file"


def _toolchain_diff(recorded: dict, current: dict) -> list[dict]:
    return [{"part": k, "lock": recorded.get(k), "here": current.get(k)}
            for k in sorted(set(recorded) | set(current)) if recorded.get(k) != current.get(k)]


def verify_variant(vid: str, entry: dict, fresh: Path, log) -> dict:
    from .graph import compile_graph

    cli = {"alloy": entry["alloy"], **dict(o.split("=", 1) for o in entry["overrides"])}
    pins = {entry["source"]["baseModel"]: entry["source"]["resolvedRevision"]} \
        if entry["source"].get("resolvedRevision") else {}
    plan = compile_graph(cli, pins=pins)
    variant = next((v for v in plan.variants if v.id == vid), None)
    report = {"variant": vid, "overrides": entry["overrides"], "files": [], "passed": False}
    if variant is None:
        report["problem"] = f"the alloys no longer produce variant {vid}"
        return report
    report["keys_changed"] = [{"step": role, "lock": entry["keys"][role], "planned": s.key}
                              for role, s in variant.steps.items()
                              if role in _SHAPING_ROLES and role in entry["keys"] and entry["keys"][role] != s.key]
    current_tc = {"fingerprint": plan.toolchain, **fingerprint_parts()}
    report["toolchain_changed"] = _toolchain_diff(entry["toolchain"], current_tc)
    # A trained source's bytes (and so every output's) hold within one CPU kernel class: a lock
    # written on another class is no reference for them here (compiler/kernels.py).
    from .lockfile import other_class

    if other := other_class(variant, entry):
        report["no_reference"] = other

    # The projector step is the converted projector or, for a quantized one, its mmproj-quantize step.
    makers = [variant.steps[r] for r in ("quantize", "projector") if r in variant.steps]
    targets = [s.task for s in makers]
    env = {**os.environ, "FORGE_BUILD_DIR": str(fresh), "FORGE_PINNED_REVISIONS": json.dumps(pins)}
    # A rebuild from nothing: nothing restored from a remote cache, nothing pushed to it.
    env.pop("FORGE_REMOTE", None)
    cmd = [sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), "--dir", str(ROOT), *targets,
           *[f"{k}={v}" for k, v in cli.items()]]
    log(f"  rebuilding {', '.join(targets)} in {fresh}")
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    report["rebuild_s"] = round(time.monotonic() - t0, 1)
    (fresh / f"verify-{vid.replace('/', '_')}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        report["problem"] = f"the rebuild failed (doit exit {proc.returncode})"
        report["rebuild_tail"] = (proc.stdout + proc.stderr)[-2000:]
        return report

    # Source: the rebuilt checkpoint's files against the lock's record of them.
    src = variant.steps["source"]
    src_manifest = _manifest(fresh / "store", src.kind, src.key) or {}
    if "files" in src_manifest and src_manifest["files"]:
        got = {f["filename"]: f["sha256"] for f in src_manifest["files"]}
        want = {f["filename"]: f["sha256"] for f in entry["source"]["files"]}
        names = set(got) | set(want)
        if report.get("no_reference"):
            # The weights are the training's, and so the class's; config, tokenizer and template
            # files are written the same on every class and are compared.
            weights = {n for n in names if n.endswith(".safetensors")}
            report["not_compared"] = sorted(weights)
            names -= weights
            report["source_compared"] = sorted(n for n in names if got.get(n) == want.get(n))
        report["source_changed"] = sorted(n for n in names if got.get(n) != want.get(n))

    by_name = {variant.text_filename: variant.steps["quantize"]}
    if variant.mmproj_filename:
        by_name[variant.mmproj_filename] = makers[-1]
    for out in entry["outputs"]:
        step = by_name.get(out["filename"])
        row = {"file": out["filename"], "lock_sha256": out["sha256"], "lock_size": out["size"]}
        if report.get("no_reference"):
            m = _manifest(fresh / "store", step.kind, step.key) if step else None
            row.update(matches=None, compared=False, rebuilt_sha256=m["files"][0]["sha256"] if m else None)
            report.setdefault("not_compared", []).append(out["filename"])
            report["files"].append(row)
            continue
        m = _manifest(fresh / "store", step.kind, step.key) if step else None
        if not m:
            row.update(matches=False, problem="the rebuild made no such file")
            report["files"].append(row)
            continue
        made = m["files"][0]
        row.update(rebuilt_sha256=made["sha256"], rebuilt_size=made["size"], matches=made["sha256"] == out["sha256"])
        if not row["matches"]:
            ref, what = _reference(build_dir() / "store", step.kind, step.key, out["sha256"])
            row["compared_with"] = what
            if ref is not None:
                row["tensor_report"] = ggufdiff.compare(ref, fresh / "store" / step.kind / step.key / made["filename"])
        report["files"].append(row)
    report["passed"] = (not report.get("no_reference") and bool(report["files"])
                        and all(f["matches"] for f in report["files"]))
    return report


def explain(report: dict) -> list[str]:
    """The report as lines a person reads top to bottom: verdict, files, then why."""
    verdict = "VERIFIED" if report["passed"] else "NO REFERENCE" if report.get("no_reference") else "MISMATCH"
    lines = [f"{report['variant']}: {verdict}"
             + (f" (rebuilt in {report['rebuild_s']} s)" if "rebuild_s" in report else "")]
    if report.get("no_reference") and not report.get("problem"):
        nr = report["no_reference"]
        lines.append(f"  the lock's hashes are for platform class {nr['lock']}; this machine trains {nr['here']}'s "
                     f"fixture: the lock has no reference for its weights or anything made from them")
        lines.append(f"  compared, identical: {', '.join(report.get('source_compared', [])) or 'nothing'}")
        if report.get("source_changed"):
            lines.append(f"  compared, DIFFERENT: {', '.join(report['source_changed'])}")
        lines.append(f"  not compared: {', '.join(report.get('not_compared', []))}")
        return lines
    if report.get("problem"):
        lines.append(f"  {report['problem']}")
        if report.get("rebuild_tail"):
            lines += ["    " + l for l in report["rebuild_tail"].splitlines()[-15:]]
    for f in report["files"]:
        if f.get("matches"):
            lines.append(f"  ok        {f['file']}  {f['lock_sha256'][:16]}  {f['lock_size']} B")
            continue
        lines.append(f"  DIFFERS   {f['file']}")
        lines.append(f"            lock    {f['lock_sha256']}  {f['lock_size']} B")
        if "rebuilt_sha256" in f:
            lines.append(f"            rebuilt {f['rebuilt_sha256']}  {f['rebuilt_size']} B")
        if f.get("problem"):
            lines.append(f"            {f['problem']}")
        if "compared_with" in f:
            lines.append(f"            tensors compared with {f['compared_with']}:")
            if "tensor_report" in f:
                lines += ggufdiff.format_report(f["tensor_report"], indent="              ")
    if not report["passed"]:
        if report.get("toolchain_changed"):
            lines.append("  the toolchain differs from the one recorded -- suspect the machine first:")
            lines += [f"    {d['part']}: lock {d['lock']!r}, here {d['here']!r}" for d in report["toolchain_changed"]]
        else:
            lines.append("  the toolchain is the one recorded (same compiler, flags, CPU architecture, Python packages)")
        if report.get("keys_changed"):
            lines.append("  the recipe changed since the lock was written (alloy, conf or stage code) -- steps re-keyed: "
                         + ", ".join(k["step"] for k in report["keys_changed"]))
        if report.get("source_changed"):
            lines.append(f"  source files differ from the lock: {', '.join(report['source_changed'])}")
        same_bytes = [f for f in report["files"] if f.get("tensor_report", {}).get("identical")]
        for f in same_bytes:
            lines.append(f"  {f['file']}: the rebuild equals {f['compared_with']} byte for byte -- the lock entry "
                         f"itself is what disagrees")
    return lines


def _kept_rebuild(given: str) -> Path:
    """A rebuild dir an earlier verify kept (a failed one, or keep=1): the comparison runs again
    against it -- after a lock was corrected, say -- without building from nothing a second time.
    Its doit finishes whatever it lacks (a variant it never built, a step re-keyed since)."""
    path = Path(given).expanduser().resolve()
    if not (path / "store").is_dir() or not path.name.startswith("run-"):
        raise ForgeError("not a rebuild dir that `doit verify` kept", where=f"rebuilt={given}",
                         found=str(path), allowed=[f"{build_dir() / 'verify'}/run-<time>-<pid> (printed as "
                                                   "'the rebuild is kept in ...')"])
    return path


def run(cli_vars: dict, keep: bool = False) -> int:
    from .lockfile import read

    lock = read()
    ids = selected(lock, {k: v for k, v in cli_vars.items() if k != "rebuilt"})
    root = build_dir() / "verify"
    root.mkdir(parents=True, exist_ok=True)
    reports, started = [], time.monotonic()
    if cli_vars.get("rebuilt"):
        fresh = _kept_rebuild(cli_vars["rebuilt"])
        print(f"verify: comparing with the rebuild kept in {fresh} (built from nothing by an earlier verify; "
              f"not rebuilt again)", flush=True)
    else:
        # One fresh build dir for this run: variants of one alloy share their source and conversion
        # inside it, as they do in a normal build, but nothing is taken from build/store.
        fresh = root / f"run-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        fresh.mkdir(parents=True)
    for vid in ids:
        print(f"verify {vid}", flush=True)
        try:
            report = verify_variant(vid, lock["variants"][vid], fresh, lambda s: print(s, flush=True))
        except ForgeError as e:
            report = {"variant": vid, "files": [], "passed": False, "problem": str(e)}
        report["build_dir"] = str(fresh)
        reports.append(report)
        print("\n".join(explain(report)), flush=True)
    summary = {"lock": str(lock_path()), "seconds": round(time.monotonic() - started, 1),
               "rebuilt_from_nothing": not cli_vars.get("rebuilt"),
               "passed": all(r["passed"] for r in reports), "variants": reports}
    (root / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    if summary["passed"] and not keep:
        shutil.rmtree(fresh, ignore_errors=True)
    else:
        print(f"the rebuild is kept in {fresh}", flush=True)
    ok = sum(r["passed"] for r in reports)
    unreferenced = [r["variant"] for r in reports if r.get("no_reference") and not r.get("problem")]
    print(f"verify: {ok} of {len(reports)} variants byte-identical to the lock in {summary['seconds']} s "
          f"(report: {root / 'report.json'})", flush=True)
    if unreferenced:
        print(f"verify: no reference for this platform class for {', '.join(unreferenced)} (exit {NO_REFERENCE})",
              flush=True)
    if summary["passed"]:
        return 0
    # Only variants without a reference, and nothing else wrong: a status of its own, so CI on
    # another platform class can tell "not comparable here" from "different".
    if len(unreferenced) == len(reports) and not any(r.get("source_changed") for r in reports):
        return NO_REFERENCE
    return 1


def main(argv: list[str]) -> int:
    """`python -m compiler.verify [alloy=..] [only=..] [tier=..] [rebuilt=..] [keep=1]`: verify with
    an exit status per outcome -- 0 identical, 1 different (or failed), 3 no reference for this
    platform class -- where `doit verify` can only say 0 or 1."""
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    bad = [a for a in argv if "=" not in a]
    if bad:
        print(f"verify: arguments are key=value (alloy=, only=, tier=, rebuilt=, keep=1): {bad}", file=sys.stderr)
        return 2
    keep = args.pop("keep", "") not in ("", "0", "false")
    try:
        return run(args, keep=keep)
    except ForgeError as e:
        print(f"verify: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
