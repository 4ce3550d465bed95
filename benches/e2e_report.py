#!/usr/bin/env python3
"""Turn the raw results of e2e.sh into a markdown report and a long-format CSV.

usage: e2e_report.py RESULTS_DIR OUT.md OUT.csv

Copied from /work/shared/bench/peers_report.py (the shared peers benchmark) and
extended with fio CPU accounting from the driver, the sustained-write phase
(longest stall, daemon peak RSS) and a check of the figures against the targets
of issue 9.

RESULTS_DIR holds facts.tsv, meta.tsv, <target>.<job>.json (fio) and
<label>.bonnie.csv (bonnie++ -q output).  Every figure gets its ratio to the
`raw` target (bonnie++: to ext4 on a loop device over the raw file).
"""
import csv
import json
import os
import re
import statistics
import sys
from collections import OrderedDict, defaultdict

BASE = "raw"
JOBS = [
    ("seqwrite", "seq write 1M QD16 (NUMJOBS jobs)", "write"),
    ("seqread", "seq read 1M QD16 (NUMJOBS jobs)", "read"),
    ("randread", "rand read 4k QD32 (NUMJOBS jobs)", "read"),
    ("randwrite", "rand write 4k QD32 (NUMJOBS jobs)", "write"),
]
PEER = "qsd-qcow2"
# bonnie++ CSV (format 1.98 / bonnie++ 2.0x); 1.97 lacks the two seek fields
BONNIE_FIELDS = [
    # key, column title, csv index (1.98), unit
    ("putc", "SeqOut per-chr", 9, "K/s"),
    ("put_block", "SeqOut block", 11, "K/s"),
    ("rewrite", "SeqOut rewrite", 13, "K/s"),
    ("getc", "SeqIn per-chr", 15, "K/s"),
    ("get_block", "SeqIn block", 17, "K/s"),
    ("seeks", "Random seeks", 19, "/s"),
    ("seq_create", "SeqCreate", 26, "/s"),
    ("seq_stat", "SeqRead(stat)", 28, "/s"),
    ("seq_del", "SeqDelete", 30, "/s"),
    ("ran_create", "RndCreate", 32, "/s"),
    ("ran_stat", "RndRead(stat)", 34, "/s"),
    ("ran_del", "RndDelete", 36, "/s"),
]
BONNIE_LAT_START = 38  # 12 latency fields, same order as the 12 figures above


def num(s):
    try:
        return float(s)
    except (TypeError, ValueError):
        return None


def fmt(v, digits=None):
    if v is None:
        return "n/a"
    if digits is None:
        a = abs(v)
        digits = 0 if a >= 100 else (1 if a >= 10 else 2)
    return f"{v:,.{digits}f}"


def ratio(v, b):
    if v is None or b is None or b == 0:
        return None
    return v / b


def rfmt(r):
    return "" if r is None else f" (×{r:.2f})"


def human_bytes(n):
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024.0


def load_json(path):
    try:
        with open(path) as f:
            txt = f.read()
        i = txt.find("{")
        return json.loads(txt[i:]) if i >= 0 else None
    except (OSError, ValueError):
        return None


def lat_us(s):
    if not s or s.startswith("+"):
        return None
    for suf, mul in (("us", 1.0), ("ms", 1000.0), ("s", 1e6)):
        if s.endswith(suf):
            return num(s[: -len(suf)]) * mul if num(s[: -len(suf)]) is not None else None
    return num(s)


def main():
    res, out_md, out_csv = sys.argv[1:4]
    meta = OrderedDict()
    with open(os.path.join(res, "meta.tsv")) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t", 2)
            if len(parts) == 3:
                meta.setdefault(parts[0], OrderedDict())[parts[1]] = parts[2]
    facts = defaultdict(dict)  # (target, section, test) -> {metric: (value, unit, note)}
    fact_order = []
    with open(os.path.join(res, "facts.tsv")) as f:
        for line in f:
            p = line.rstrip("\n").split("\t")
            p += [""] * (7 - len(p))
            t, sec, test, metric, value, unit, note = p[:7]
            facts[(t, sec, test)][metric] = (value, unit, note)
            if t not in fact_order:
                fact_order.append(t)
    run = meta.get("_run", {})
    targets = [t for t in meta if t != "_run"]
    active = [t for t in targets if meta[t].get("status") == "ok"]
    skipped = [t for t in targets if meta[t].get("status", "").startswith("skipped")]

    rows = []  # csv rows

    def emit(section, target, test, metric, value, unit, base_value, note=""):
        r = ratio(value, base_value)
        rows.append([section, target, test, metric,
                     "" if value is None else (f"{value:.6g}" if isinstance(value, float) else value),
                     unit, "" if r is None else f"{r:.4f}", note])
        return r

    def fget(t, sec, test, metric):
        v = facts.get((t, sec, test), {}).get(metric)
        return (num(v[0]), v[2]) if v else (None, "")

    # ---------------------------------------------------------------- fio
    # fio facts are keyed "JOB#ROUND"; JSON files are <t>.<job>.r<round>.json
    rounds = defaultdict(set)
    for (ft, sec, test) in facts:
        if sec == "fio" and "#" in test:
            job, r = test.split("#", 1)
            rounds[(ft, job)].add(r)

    def load_round(t, job, kind, r):
        test = f"{job}#{r}"
        d = load_json(os.path.join(res, f"{t}.{job}.r{r}.json"))
        rc, rc_note = fget(t, "fio", test, "rc")
        wall, _ = fget(t, "fio", test, "wall_s")
        dcpu, _ = fget(t, "fio", test, "daemon_cpu_s")
        fcpu, _ = fget(t, "fio", test, "fio_cpu_s")
        drain, _ = fget(t, "fio", test, "drain_s")
        fsync, _ = fget(t, "fio", test, "fsync_s")
        hbusy, _ = fget(t, "fio", test, "host_busy_pct")
        hsteal, _ = fget(t, "fio", test, "host_steal_pct")
        dp99, _ = fget(t, "fio", test, "daemon_p99_us")
        m = {"rc": rc, "note": rc_note, "drain_s": drain, "fsync_s": fsync, "steal_pct": hsteal,
             "daemon_p99_us": dp99}
        if d and d.get("jobs"):
            j = d["jobs"][0]
            io = j.get(kind, {})
            bw = io.get("bw_bytes") or 0
            clat = io.get("clat_ns", {})
            m.update({
                "mbps": bw / 1e6,
                "iops": io.get("iops"),
                "p99_us": (clat.get("percentile", {}).get("99.000000") or 0) / 1000.0 or None,
                "max_us": (clat.get("max") or 0) / 1000.0 or None,
                "fio_usr": j.get("usr_cpu"),
                "fio_sys": j.get("sys_cpu"),
            })
            if dcpu is not None and wall:
                m["daemon_cpu_pct"] = 100.0 * dcpu / wall
            m["daemon_cpu_s"] = dcpu
            if hbusy is not None:
                m["other_cpu_pct"] = max(0.0, hbusy - (m["fio_usr"] or 0) - (m["fio_sys"] or 0)
                                         - (m.get("daemon_cpu_pct") or 0))
            if bw > 0 and wall:
                if fcpu is not None:   # measured by the driver (all fio threads, incl. ramp)
                    cores = (fcpu + (dcpu or 0)) / wall
                else:
                    cores = ((m["fio_usr"] or 0) + (m["fio_sys"] or 0)) / 100.0 + ((dcpu or 0) / wall)
                m["core_s_per_gib"] = cores / (bw / 2**30)
        return m

    fio = {}         # (t, job) -> median over rounds (+ "<key>_min"/"<key>_max", "n")
    fio_rounds = {}  # (t, job) -> [(round, metrics), ...]
    AGG_KEYS = ["mbps", "iops", "p99_us", "daemon_p99_us", "max_us", "fio_usr", "fio_sys", "daemon_cpu_pct", "daemon_cpu_s",
                "core_s_per_gib", "other_cpu_pct", "steal_pct", "fsync_s", "drain_s"]
    for t in active:
        for job, _, kind in JOBS + [("prefill", "prefill", "write")]:
            rs = sorted(rounds.get((t, job), []), key=lambda x: int(x) if x.isdigit() else 0)
            if not rs:
                continue  # job not run for this target (e.g. no prefill on CoW targets)
            per = [(r, load_round(t, job, kind, r)) for r in rs]
            agg = {"n": len(per),
                   "rc": max((m["rc"] for _, m in per if m["rc"] is not None), default=None),
                   "note": "; ".join(sorted({m["note"] for _, m in per if m.get("note")}))}
            for key in AGG_KEYS:
                vals = [m[key] for _, m in per if m.get(key) is not None]
                if vals:
                    agg[key] = statistics.median(vals)
                    agg[key + "_min"], agg[key + "_max"] = min(vals), max(vals)
            fio[(t, job)] = agg
            fio_rounds[(t, job)] = per

    def fv(t, job, key):
        return fio.get((t, job), {}).get(key)

    fio_metrics = [
        ("mbps", "MB/s", "MB/s"), ("iops", "IOPS", "IOPS"), ("p99_us", "p99 lat", "us"),
        ("daemon_p99_us", "daemon p99", "us"), ("max_us", "max lat", "us"), ("fio_usr", "fio usr%", "%"), ("fio_sys", "fio sys%", "%"),
        ("daemon_cpu_pct", "daemon CPU%", "% of 1 core"), ("core_s_per_gib", "core·s/GiB", "core-s/GiB"),
        ("other_cpu_pct", "other CPU%", "% of 1 core"), ("steal_pct", "steal%", "% of 1 core"),
        ("fsync_s", "fsync s", "s"), ("drain_s", "drain s", "s"),
    ]
    base_rounds = {}
    for job, _, _ in JOBS + [("prefill", "prefill", "write")]:
        base_rounds[job] = dict(fio_rounds.get((BASE, job), []))
    for t in active:
        for job, _, _ in JOBS + [("prefill", "prefill", "write")]:
            if (t, job) not in fio:
                continue
            n = fv(t, job, "n") or 1
            for key, _, unit in fio_metrics:
                v = fv(t, job, key)
                if v is None:
                    continue
                note = fv(t, job, "note") or ""
                if n > 1:
                    note = (f"median of {n} rounds, min {fv(t, job, key + '_min'):.6g} "
                            f"max {fv(t, job, key + '_max'):.6g}" + (f"; {note}" if note else ""))
                emit("fio", t, job, key, float(v), unit, fv(BASE, job, key), note)
            for r, m in fio_rounds[(t, job)]:   # per-round raw figures, ratio to raw in the same round
                for key, _, unit in fio_metrics:
                    if m.get(key) is None:
                        continue
                    emit("fio-round", t, f"{job}#{r}", key, float(m[key]), unit,
                         base_rounds[job].get(r, {}).get(key), m.get("note") or "")

    # ---------------------------------------------------------------- space
    space = {}
    pagecache = {}
    unsettled = {}
    reclaim_wait = {}
    for t in active:
        ta, _ = fget(t, "space", "total", "apparent_bytes")
        tb, _ = fget(t, "space", "total", "alloc_bytes")
        pagecache[t], _ = fget(t, "space", "total", "pagecache_bytes")
        unsettled[t], _ = fget(t, "space", "total", "alloc_bytes_unsettled")
        reclaim_wait[t], _ = fget(t, "space", "total", "reclaim_wait_s")
        parts = []
        for (ft, sec, test), ms in facts.items():
            if ft == t and sec == "space" and test != "total":
                a = num(ms.get("apparent_bytes", ("", "", ""))[0])
                b = num(ms.get("alloc_bytes", ("", "", ""))[0])
                note = ms.get("apparent_bytes", ("", "", ""))[2]
                parts.append(f"{test}: {human_bytes(b)} used / {human_bytes(a)} apparent" + (f" ({note})" if note else ""))
                emit("space", t, test, "apparent_bytes", a, "B", None)
                emit("space", t, test, "alloc_bytes", b, "B", None)
        space[t] = (ta, tb, "; ".join(parts))
    base_space = space.get(BASE, (None, None, ""))
    for t in active:
        ta, tb, _ = space[t]
        emit("space", t, "total", "apparent_bytes", ta, "B", base_space[0])
        emit("space", t, "total", "alloc_bytes", tb, "B", base_space[1])
        emit("space", t, "total", "pagecache_bytes", pagecache[t], "B", None)
        emit("space", t, "total", "alloc_bytes_unsettled", unsettled[t], "B", None)
        emit("space", t, "total", "reclaim_wait_s", reclaim_wait[t], "s", None)

    # ---------------------------------------------------------------- bonnie
    bonnie = OrderedDict()
    bonnie_status = OrderedDict()
    for label in ["hostfs"] + targets:
        st = facts.get((label, "bonnie", "bonnie"), {})
        if not st:
            continue
        status = st.get("status", ("", "", ""))
        bonnie_status[label] = (status[0], status[2], num(st.get("wall_s", ("", "", ""))[0]),
                                num(st.get("daemon_cpu_s", ("", "", ""))[0]))
        path = os.path.join(res, f"{label}.bonnie.csv")
        if status[0] != "ok" or not os.path.exists(path):
            continue
        with open(path) as f:
            lines = [l for l in f.read().splitlines() if l.count(",") > 20]
        if not lines:
            continue
        fields = lines[-1].split(",")
        shift = -2 if fields[0].startswith("1.97") else 0
        vals = {}
        for key, _, idx, unit in BONNIE_FIELDS:
            i = idx + shift
            raw = fields[i] if i < len(fields) else ""
            vals[key] = (num(raw), raw, fields[i + 1] if i + 1 < len(fields) else "")
        for n, (key, _, _, _) in enumerate(BONNIE_FIELDS):
            i = BONNIE_LAT_START + shift + n
            vals[key + "_lat"] = lat_us(fields[i]) if i < len(fields) else None
        bonnie[label] = vals
    bb = bonnie.get(BASE, {})
    for label, vals in bonnie.items():
        for key, _, _, unit in BONNIE_FIELDS:
            v, raw, cpu = vals[key]
            note = "too fast to measure (+++++)" if raw.startswith("+") else ("not reported" if raw == "" else "")
            emit("bonnie", label, key, "rate", v, unit, bb.get(key, (None,))[0], note)
            emit("bonnie", label, key, "cpu_pct", num(cpu), "%", num(bb.get(key, (None, "", ""))[2]))
            emit("bonnie", label, key, "latency_us", vals[key + "_lat"], "us", bb.get(key + "_lat"))

    # ---------------------------------------------------------------- sustained write
    sustain = OrderedDict()
    for t in active:
        st = facts.get((t, "sustain", "sustain"))
        if not st:
            continue
        m = {k: num(v[0]) for k, v in st.items()}
        m["note"] = st.get("rc", ("", "", ""))[2]
        d = load_json(os.path.join(res, f"{t}.sustain.json"))
        runtime_ms = None
        if d and d.get("jobs"):
            j = d["jobs"][0]
            io = j.get("write", {})
            clat = io.get("clat_ns", {})
            m["mbps"] = (io.get("bw_bytes") or 0) / 1e6
            m["p99_ms"] = (clat.get("percentile", {}).get("99.000000") or 0) / 1e6 or None
            m["max_ms"] = (clat.get("max") or 0) / 1e6 or None
            runtime_ms = io.get("runtime")
            if m.get("wall_s") and m["mbps"]:
                cores = ((m.get("fio_cpu_s") or 0) + (m.get("daemon_cpu_s") or 0)) / m["wall_s"]
                m["core_s_per_gib"] = cores / (m["mbps"] * 1e6 / 2**30)
        # longest time without any completion, from the per-I/O completion log
        times = []
        for name in (f"{t}.sustain_clat.1.log", f"{t}.sustain_clat.log"):
            path = os.path.join(res, name)
            if os.path.exists(path):
                with open(path) as f:
                    for line in f:
                        p = line.split(",")
                        if p and p[0].strip().isdigit():
                            times.append(int(p[0]))
                break
        if times:
            times.sort()
            gaps = [b - a for a, b in zip(times, times[1:])]
            if runtime_ms and runtime_ms > times[-1]:
                gaps.append(runtime_ms - times[-1])
            m["gap_ms"] = max(gaps) if gaps else 0
            m["n_io"] = len(times)
        m["stall_ms"] = (max(x for x in (m.get("gap_ms"), m.get("max_ms"), 0) if x is not None)
                         if m.get("mbps") else None)
        if m.get("daemon_max_us") is not None:
            m["daemon_max_ms"] = m["daemon_max_us"] / 1000.0
        if m.get("rss_peak_kib") is not None:
            m["rss_peak_mib"] = max(m.get("rss_peak_kib") or 0, m.get("rss_hwm_kib") or 0) / 1024.0
        sustain[t] = m
        for key, unit in (("mbps", "MB/s"), ("p99_ms", "ms"), ("max_ms", "ms"), ("gap_ms", "ms"),
                          ("stall_ms", "ms"), ("rss_peak_mib", "MiB"), ("core_s_per_gib", "core-s/GiB"),
                          ("fsync_s", "s"), ("daemon_max_ms", "ms")):
            if m.get(key) is not None:
                emit("sustain", t, "sustain", key, float(m[key]), unit,
                     sustain.get(BASE, {}).get(key) if t != BASE else m[key], m.get("note") or "")

    def sus_fsync(t):
        v, _ = fget(t, "fio", "sustain#1", "fsync_s")
        return v

    # ---------------------------------------------------------------- issue 9 targets
    checks = []  # (target, what, value, goal, ok)

    def chk(t, what, v, goal, ok):
        if v is not None:
            checks.append((t, what, v, goal, ok))

    def r_raw(t, job, key):
        return ratio(fv(t, job, key), fv(BASE, job, key))

    def r_peer(t, job, key):
        return ratio(fv(t, job, key), fv(PEER, job, key))

    names = {"seqread": ("seq read", "mbps"), "seqwrite": ("seq write", "mbps"),
             "randread": ("4k rand read", "iops"), "randwrite": ("4k rand write", "iops")}
    zstd_targets = [t for t in ("vbdfs-zstd", "vbdfs-zstd-16k", "vbdfs-zstd-adapt") if t in active]
    for t in zstd_targets:
        for job, goal in (("seqread", 0.9), ("seqwrite", 0.7), ("randread", 0.6), ("randwrite", 0.6)):
            label, key = names[job]
            r = r_raw(t, job, key)
            chk(t, f"{label} vs raw", r, f">= {goal}x", r is not None and r >= goal)
            r = r_peer(t, job, key)
            chk(t, f"{label} vs {PEER}", r, ">= 2x", r is not None and r >= 2.0)
    if "vbdfs-none" in active:
        for job in ("seqread", "seqwrite"):
            label, key = names[job]
            r = r_raw("vbdfs-none", job, key)
            chk("vbdfs-none", f"{label} vs raw", r, ">= 0.9x", r is not None and r >= 0.9)
    for t in ("vbdfs-zstd", "vbdfs-zstd-16k", "vbdfs-zstd-adapt", "vbdfs-none"):
        if t not in active:
            continue
        r = ratio(fv(t, "randwrite", "p99_us"), fv(BASE, "randwrite", "p99_us"))
        chk(t, "4k rand write p99 vs raw", r, "<= 2x", r is not None and r <= 2.0)
        m = sustain.get(t, {})
        if m.get("mbps") and m.get("stall_ms") is not None:
            early = " (stopped early)" if m.get("note") else ""
            chk(t, f"longest stall in {fmt(m.get('wall_s'), 0)} s sustained write{early} (ms)", m["stall_ms"],
                "<= 250 ms", m["stall_ms"] <= 250)
        if m.get("rss_peak_mib") is not None and m.get("cache_mib") is not None:
            lim = m["cache_mib"] + 64
            chk(t, "daemon peak RSS (MiB)", m["rss_peak_mib"], f"<= cache + 64 = {lim:.0f} MiB",
                m["rss_peak_mib"] <= lim)

    if PEER in bonnie:
        for t in ("vbdfs-zstd", "vbdfs-zstd-16k", "vbdfs-zstd-adapt", "vbdfs-none"):
            if t not in bonnie:
                continue
            for key, label in (("put_block", "bonnie++ block write"), ("rewrite", "bonnie++ rewrite"),
                               ("get_block", "bonnie++ block read")):
                v, pv = bonnie[t][key][0], bonnie[PEER][key][0]
                r = ratio(v, pv)
                chk(t, f"{label} vs {PEER}", r, ">= 1x", r is not None and r >= 1.0)

    # ---------------------------------------------------------------- markdown
    L = []
    mnj = re.search(r"NUMJOBS=(\d+)", run.get("params", ""))
    numjobs = mnj.group(1) if mnj else "1"
    L.append(f"# vbdfs end-to-end I/O benchmark ({run.get('mode', '?')} mode)")
    L.append("")
    L.append("Generated by `benches/e2e.sh` (do not edit by hand; re-run to refresh).")
    L.append("")
    L.append(f"- command: `{run.get('command', '?')}`")
    L.append(f"- machine: {run.get('machine', '?')}")
    L.append(f"- started: {run.get('started', '?')}; total runtime {run.get('runtime_s', '?')} s "
             f"(teardown {run.get('teardown_s', '?')} s)")
    L.append(f"- host: {run.get('host', '?')}; host CPU busy (all processes, % of all cores) in the 1 s before "
             f"the run: {run.get('busy_before', '?')}%, after: {run.get('busy_after', '?')}%; during each fio run "
             "see `other CPU%` (host busy minus fio and the daemon: kernel workers + other tenants) and `steal%`")
    L.append(f"- params: {run.get('params', '?')}")
    L.append(f"- versions: {run.get('versions', '?')}")
    L.append("- fio: ioengine=libaio, direct=1 where O_DIRECT opens (column O_DIRECT), time based with ramp, "
             "buffer_compress_percentage=50 + refill_buffers; job-major order with the target order rotated "
             "per job. `(×r)` = ratio to `raw`; for latency, CPU and drain, >1 means worse. With ROUNDS>1 "
             "every figure is the median over rounds, `[min–max]` shows the spread of MB/s and IOPS. "
             "`daemon p99` = the vbdfs daemon's own p99 for the same requests (control file, reset before "
             "each run, ramp included; from reading a request to replying, without the kernel's queue).")
    L.append("")

    L.append("## Targets")
    L.append("")
    L.append("| target | status | O_DIRECT | what |")
    L.append("|---|---|---|---|")
    for t in targets:
        m = meta[t]
        st = m.get("status", "?")
        d = {"1": "yes", "0": "no (buffered)"}.get(m.get("direct", ""), "")
        L.append(f"| {t} | {st} | {d} | {m.get('desc', '')} |")
    L.append("")

    L.append("## Summary (fio; host space after the write phases)")
    L.append("")
    L.append("| target | seq write MB/s | seq read MB/s | rand read 4k IOPS | rand write 4k IOPS | "
             "rand write p99 | host space used |")
    L.append("|---|---|---|---|---|---|---|")
    for t in active:
        cells = [t]
        for job, key in (("seqwrite", "mbps"), ("seqread", "mbps"), ("randread", "iops"), ("randwrite", "iops")):
            v = fv(t, job, key)
            cells.append(fmt(v) + rfmt(ratio(v, fv(BASE, job, key))))
        v = fv(t, "randwrite", "p99_us")
        cells.append((fmt(v) + " us" if v is not None else "n/a") + rfmt(ratio(v, fv(BASE, "randwrite", "p99_us"))))
        tb = space.get(t, (None, None, ""))[1]
        cells.append(human_bytes(tb) + rfmt(ratio(tb, base_space[1])))
        L.append("| " + " | ".join(cells) + " |")
    for t in skipped:
        L.append(f"| {t} | {meta[t]['status']} | | | | | |")
    L.append("")

    for job, title, _ in [(j, ti.replace("NUMJOBS", numjobs), k) for j, ti, k in JOBS] + [("prefill", "prefill (first write of the read region, size based; CoW targets: none, data is in the base)", "write")]:
        if not any((t, job) in fio and fio[(t, job)].get("mbps") is not None for t in active):
            continue
        L.append(f"## fio: {title}")
        L.append("")
        L.append("| target | " + " | ".join(title + (" (us)" if unit == "us" else "") for _, title, unit in fio_metrics) + " |")
        L.append("|---|" + "---|" * len(fio_metrics))
        for t in active:
            if (t, job) not in fio:
                if job == "prefill" and meta[t].get("cow") == "1":
                    L.append(f"| {t} | – (read region is in the base image) |" + " |" * (len(fio_metrics) - 1))
                continue
            m = fio[(t, job)]
            if m.get("mbps") is None:
                L.append(f"| {t} | failed rc={fmt(m.get('rc'), 0)} {m.get('note', '')} |" + " |" * (len(fio_metrics) - 1))
                continue
            cells = [t + (" ⚠ " + m["note"] if m.get("note") else "")]
            for key, _, _ in fio_metrics:
                v = m.get(key)
                if key in ("fio_usr", "fio_sys"):
                    cells.append(fmt(v, 1) + rfmt(ratio(v, fv(BASE, job, key))))
                elif key == "daemon_cpu_pct":
                    cells.append(fmt(v, 0) if v is not None else ("kernel" if t.startswith("loop") else "–"))
                elif key in ("drain_s", "fsync_s"):
                    cells.append("" if v is None else fmt(v, 2))
                elif key in ("other_cpu_pct", "steal_pct"):
                    cells.append("" if v is None else fmt(v, 0))
                elif key == "daemon_p99_us":
                    cells.append("–" if v is None else fmt(v))
                else:
                    spread = ""
                    if key in ("mbps", "iops") and (m.get("n") or 1) > 1:
                        spread = f" [{fmt(m.get(key + '_min'))}–{fmt(m.get(key + '_max'))}]"
                    cells.append(fmt(v) + rfmt(ratio(v, fv(BASE, job, key))) + spread)
            L.append("| " + " | ".join(cells) + " |")
        L.append("")

    if checks:
        L.append("## Targets of issue 9 (same run)")
        L.append("")
        L.append("| image | figure | measured | goal | met |")
        L.append("|---|---|---|---|---|")
        for t, what, v, goal, ok in checks:
            L.append(f"| {t} | {what} | {fmt(v, 2)} | {goal} | {'yes' if ok else '**no**'} |")
        L.append("")

    if sustain:
        L.append("## Sustained write (seq 1M QD16, 1 job, time based)")
        L.append("")
        L.append("`longest gap` = longest time in which no write completed (from fio's per-I/O completion log); "
                 "`stall` = the larger of that and the worst completion latency. `peak RSS` = max of the 0.2 s "
                 "samples and the daemon's VmHWM. `fsync after` = time to make the whole run durable. "
                 "`daemon max` = the longest write as the vbdfs daemon measured it (control file "
                 "`write-latency-us`, from reading the request to replying; after `reset-stats`).")
        L.append("")
        L.append("| target | MB/s | p99 lat ms | max lat ms | longest gap ms | stall ms | daemon max ms | core·s/GiB | daemon peak RSS MiB | cache MiB | fsync after s | note |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        sb = sustain.get(BASE, {})
        for t, m in sustain.items():
            rss = m.get("rss_peak_mib")
            L.append(f"| {t} | {fmt(m.get('mbps'))}{rfmt(ratio(m.get('mbps'), sb.get('mbps')))} | "
                     f"{fmt(m.get('p99_ms'))} | {fmt(m.get('max_ms'))} | {fmt(m.get('gap_ms'))} | "
                     f"{fmt(m.get('stall_ms'))} | {fmt(m.get('daemon_max_ms'))} | {fmt(m.get('core_s_per_gib'))} | "
                     f"{'–' if rss is None else fmt(rss)} | {fmt(m.get('cache_mib'), 0) if m.get('cache_mib') is not None else '–'} | "
                     f"{fmt(sus_fsync(t))} | {m.get('note') or ''} |")
        L.append("")

    L.append("## Host space after the fio write phases")
    L.append("")
    L.append("| target | du (allocated) | du --apparent-size | in the host page cache | right after the writes | "
             "dead space punched within | breakdown |")
    L.append("|---|---|---|---|---|---|---|")
    for t in active:
        ta, tb, parts = space[t]
        after = human_bytes(unsettled[t]) if unsettled.get(t) is not None else "–"
        wait = f"{fmt(reclaim_wait[t])} s" if reclaim_wait.get(t) is not None else "–"
        L.append(f"| {t} | {human_bytes(tb)}{rfmt(ratio(tb, base_space[1]))} | "
                 f"{human_bytes(ta)}{rfmt(ratio(ta, base_space[0]))} | "
                 f"{human_bytes(pagecache.get(t))} | {after} | {wait} | {parts} |")
    L.append("")
    L.append("vbdfs holds the space of overwritten records for a moment and then punches it: \"right after the "
             "writes\" is what the image took when the last write phase ended; du is measured once the control "
             "file showed no dead space pending (\"punched within\", at most 60 s).")
    L.append("")
    L.append("\"In the host page cache\": how much of the target's files the host page cache held after the fio "
             "phases (`fincore`). fio's `direct=1` keeps the guest side out of the page cache, not what a daemon "
             "or a buffered loop device reads on its behalf: reads served from these pages never reached the disk.")
    L.append("")

    if bonnie_status:
        L.append("## bonnie++: ext4 on a loop device over each flat file")
        L.append("")
        confined = any("memory cgroup" in note for _, note, _, _ in bonnie_status.values())
        cache_note = ("each bonnie++ ran in a memory cgroup of `-r` MiB, so its page cache cannot hold the 2x file "
                      "and block read reaches the target; the `raw` row's loop device still reads the raw file "
                      "through the host page cache, outside the cgroup, so its reads are cache-fast"
                      if confined else
                      "2x RAM is impractical here; file size is far below RAM, so the SeqIn/seeks/stat phases are "
                      "served from the page cache and often finish too fast to measure (`+++++`)")
        L.append(f"`bonnie++ -u root {run.get('params', '').split('bonnie++ ')[-1]}` ({cache_note}; "
                 "the SeqOut phases end with fsync and do reach the target). "
                 "Ratios are to the `raw` row = ext4 on a loop device over the raw file (the same stack as the "
                 "`loop` target). `hostfs` = bonnie++ directly on the host ext4, no loop (reference only). "
                 "bonnie++ 2.x per-chr tests are one syscall per byte (CPU bound).")
        L.append("")
        L.append("| target | " + " | ".join(f"{title} {unit}" for _, title, _, unit in BONNIE_FIELDS) + " | wall s |")
        L.append("|---|" + "---|" * (len(BONNIE_FIELDS) + 1))
        for label, (st, note, wall, dcpu) in bonnie_status.items():
            if label not in bonnie:
                L.append(f"| {label} | {st}: {note} |" + " |" * len(BONNIE_FIELDS))
                continue
            cells = [label]
            for key, _, _, _ in BONNIE_FIELDS:
                v, raw, _ = bonnie[label][key]
                if v is None:
                    cells.append(raw or "n/a")
                else:
                    cells.append(fmt(v, 0) + rfmt(ratio(v, bb.get(key, (None,))[0])))
            cells.append(fmt(wall, 0))
            L.append("| " + " | ".join(cells) + " |")
        L.append("")
        L.append("bonnie++ latencies (max per phase, us; ratio to raw):")
        L.append("")
        L.append("| target | " + " | ".join(title for _, title, _, _ in BONNIE_FIELDS) + " |")
        L.append("|---|" + "---|" * len(BONNIE_FIELDS))
        for label, vals in bonnie.items():
            cells = [label]
            for key, _, _, _ in BONNIE_FIELDS:
                v = vals[key + "_lat"]
                cells.append(fmt(v, 0) + rfmt(ratio(v, bb.get(key + "_lat"))))
            L.append("| " + " | ".join(cells) + " |")
        L.append("")

    L.append("## Skipped targets")
    L.append("")
    if skipped:
        for t in skipped:
            L.append(f"- **{t}**: {meta[t]['status']}")
    else:
        L.append("- none")
    L.append("")
    L.append("## Caveats built into the setup")
    L.append("")
    L.append("- Shared 2-core machine: other tenants add noise; compare ratios within one run, not across runs.")
    L.append("- `loop` is the default buffered loop device (Xen `file:`): its writes land in the host page cache "
             "of the backing file, so reads after the pre-fill may be cache hits and writes look fast; "
             "`drain s` is the fsync time that was deferred. Its loop kernel worker CPU is not attributed.")
    L.append("- qsd targets run with cache.direct=on on every file node, so no host page cache.")
    L.append("- vbdfs targets: `vbdfs create --compress none|zstd`, `vbdfs mount -o cache=...`; the daemon serves the "
             "file with direct I/O from its own bounded cache; its CPU is the daemon process (all threads).")
    L.append("- `loop-dio` (losetup --direct-io=on) is the recommended loop setup for Xen `file:`; bonnie++ is "
             "not repeated for loop variants.")
    L.append("- `daemon CPU%` = daemon utime+stime delta over the fio wall time (incl. ramp) / wall, in % of one "
             "core; `core·s/GiB` = (fio CPU measured by the driver + daemon CPU) / wall, per GiB/s moved (kernel worker CPU, e.g. the "
             "loop worker, is not in it but shows up in `other CPU%`). `fsync s` = time of fsync() on the flat file "
             "after a write job; `drain s` = further wait until the backend reported no dirty data.")
    L.append("")

    with open(out_md, "w") as f:
        f.write("\n".join(L))
    with open(out_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["section", "target", "test", "metric", "value", "unit", "ratio_to_raw", "note"])
        for t in targets:
            if meta[t].get("status") != "ok":
                w.writerow(["target", t, "", "status", "", "", "", meta[t].get("status", "")])
        for label, (st, note, wall, dcpu) in bonnie_status.items():
            if st != "ok":
                w.writerow(["bonnie", label, "", "status", "", "", "", f"{st}: {note}"])
        w.writerows(rows)


if __name__ == "__main__":
    main()
