"""Per-kernel register / shared-memory / spill table from a build log made with -Xptxas=-v.

python scripts/ptxas_report.py build.log
"""

import re
import shutil
import subprocess
import sys


def demangle(names):
    if not names or shutil.which("c++filt") is None:
        return names
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def short(name):
    name = name.replace("lily::cuda::(anonymous namespace)::", "").replace("void ", "", 1)
    name = re.sub(r"lily::cuda::AccType<([^>]*)>::type", r"acc<\1>", name)
    head = name.split("(", 1)[0]  # drop the parameter list
    return head.replace("__nv_bfloat16", "bf16").replace("__half", "half")


def parse(text):
    rows, current = [], None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
        if m:
            current = {"kernel": m.group(1), "arch": m.group(2), "regs": "?", "smem": "0", "stack": "0", "spill": "0/0"}
            rows.append(current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current["stack"], current["spill"] = m.group(1), f"{m.group(2)}/{m.group(3)}"
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["regs"] = m.group(1)
            s = re.search(r"(\d+) bytes smem", line)
            current["smem"] = s.group(1) if s else "0"
    seen, unique = set(), []
    for r in rows:  # ninja may print a file's output twice on rebuilds
        key = (r["kernel"], r["arch"])
        if key not in seen:
            seen.add(key)
            unique.append(r)
    names = demangle([r["kernel"] for r in unique])
    for r, n in zip(unique, names):
        r["name"] = short(n)
    return sorted(unique, key=lambda r: r["name"])


def main():
    text = open(sys.argv[1], errors="replace").read()
    rows = parse(text)
    print("| kernel | arch | registers | static smem B | stack B | spill st/ld B |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {r['arch']} | {r['regs']} | {r['smem']} | {r['stack']} | {r['spill']} |")
    spills = [r for r in rows if r["spill"] != "0/0"]
    print(
        f"\n{len(rows)} kernels, {len(spills)} with spills"
        + (": " + ", ".join(r["name"] for r in spills) if spills else "")
    )


if __name__ == "__main__":
    main()
