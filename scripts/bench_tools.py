#!/usr/bin/env python3
"""Helpers for scripts/bench (python3 standard library only).

Sub-commands (all print machine-readable output on stdout, diagnostics on
stderr, and exit non-zero with a clear message on failure):

  freeport                                  print a free TCP port on 127.0.0.1
  wait-v2 URL TIMEOUT                       poll GET URL/v2/ until it answers 200/401
  gen-blobs DIR COUNT SIZE                  write COUNT random files, print "path digest size"
  make-layout DIR LAYERS LAYER_SIZE         write an OCI image layout (uncompressed tar layers)
  push-small URL NAME TAG                   push config + 1 layer + OCI manifest, print digest
  check-manifest URL NAME REF DIGEST        GET a manifest, verify status/content-type/digest
  check-blob URL NAME DIGEST SIZE           GET a blob, verify status/length/sha256
  upload URL NAME PARALLEL LISTFILE         monolithic POST+PUT (curl) of every file in LISTFILE,
                                            print "seconds bytes"
  wrk-parse FILE                            print "req_per_s transfer_bytes_per_s requests non2xx errors"
  render RESULTS_TSV META_TSV OUT           print the results table and write it as markdown
"""

import concurrent.futures
import hashlib
import http.client
import io
import json
import os
import re
import socket
import subprocess
import sys
import tarfile
import time
import urllib.parse

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
CHUNK = 1 << 20


class BenchError(Exception):
    pass


def fail(msg):
    raise BenchError(msg)


def sha256_digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def split_url(base):
    u = urllib.parse.urlsplit(base)
    if u.scheme != "http" or not u.hostname:
        fail(f"expected an http://host:port base URL, got {base!r}")
    return u.hostname, u.port or 80


def conn_for(base, timeout=60):
    host, port = split_url(base)
    return http.client.HTTPConnection(host, port, timeout=timeout, blocksize=CHUNK)


def request(base, method, path, body=None, headers=None, timeout=60):
    """One request on a fresh connection; returns (status, headers-dict-lower, body bytes).
    BENCH_AUTH, when set, is sent as the Authorization header."""
    c = conn_for(base, timeout)
    headers = dict(headers or {})
    if os.environ.get("BENCH_AUTH"):
        headers["Authorization"] = os.environ["BENCH_AUTH"]
    try:
        c.request(method, path, body=body, headers=headers)
        r = c.getresponse()
        data = r.read()
        hdrs = {k.lower(): v for k, v in r.getheaders()}
        return r.status, hdrs, data
    except OSError as e:
        fail(f"{method} {base}{path}: connection error: {e}")
    finally:
        c.close()


def describe(method, path, status, hdrs, body):
    snippet = body[:300].decode("utf-8", "replace") if body else ""
    return f"{method} {path} -> HTTP {status} (content-type={hdrs.get('content-type')!r}) body={snippet!r}"


def location_to_path(base, location):
    """Turn an upload Location header (absolute or relative) into a request path."""
    if not location:
        fail("upload response has no Location header")
    u = urllib.parse.urlsplit(location)
    if u.scheme:
        host, port = split_url(base)
        if (u.hostname, u.port or 80) != (host, port):
            fail(f"upload Location {location!r} points to another host than {base}")
    path = u.path
    if not path.startswith("/"):
        fail(f"upload Location {location!r} is not an absolute path")
    return path + ("?" + u.query if u.query else "")


def add_query(path, key, value):
    sep = "&" if "?" in path else "?"
    return f"{path}{sep}{key}={urllib.parse.quote(value, safe=':')}"


def push_blob_bytes(base, name, data):
    digest = sha256_digest(data)
    p = f"/v2/{name}/blobs/uploads/"
    st, h, b = request(base, "POST", p, headers={"Content-Length": "0"})
    if st != 202:
        fail("starting upload failed: " + describe("POST", p, st, h, b))
    put = add_query(location_to_path(base, h.get("location")), "digest", digest)
    st, h, b = request(base, "PUT", put, body=data,
                       headers={"Content-Type": "application/octet-stream",
                                "Content-Length": str(len(data))})
    if st != 201:
        fail("completing upload failed: " + describe("PUT", put, st, h, b))
    got = h.get("docker-content-digest")
    if got and got != digest:
        fail(f"PUT {put}: Docker-Content-Digest {got} != expected {digest}")
    return digest


# ---------------------------------------------------------------- commands

def cmd_freeport():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])
    s.close()


def cmd_wait_v2(base, timeout):
    deadline = time.monotonic() + float(timeout)
    last = "no attempt"
    while time.monotonic() < deadline:
        try:
            c = conn_for(base, timeout=2)
            c.request("GET", "/v2/")
            r = c.getresponse()
            r.read()
            c.close()
            if r.status in (200, 401):
                return
            last = f"HTTP {r.status}"
        except OSError as e:
            last = str(e)
        time.sleep(0.1)
    fail(f"{base}/v2/ did not answer within {timeout}s (last: {last})")


def random_file(path, size):
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 8 * CHUNK)
            b = os.urandom(n)
            h.update(b)
            f.write(b)
            left -= n
    return "sha256:" + h.hexdigest()


def cmd_gen_blobs(d, count, size):
    os.makedirs(d, exist_ok=True)
    for i in range(int(count)):
        p = os.path.join(d, f"blob-{i:03d}")
        digest = random_file(p, int(size))
        print(p, digest, size)


def write_blob_file(layout, path_tmp):
    """Move a finished temp file into blobs/sha256/<hex>; return (digest, size)."""
    h = hashlib.sha256()
    with open(path_tmp, "rb") as f:
        while True:
            b = f.read(8 * CHUNK)
            if not b:
                break
            h.update(b)
    hexd = h.hexdigest()
    os.replace(path_tmp, os.path.join(layout, "blobs", "sha256", hexd))
    return "sha256:" + hexd, os.path.getsize(os.path.join(layout, "blobs", "sha256", hexd))


def write_blob_bytes(layout, data):
    digest = sha256_digest(data)
    with open(os.path.join(layout, "blobs", "sha256", digest[7:]), "wb") as f:
        f.write(data)
    return digest, len(data)


class RandomReader(io.RawIOBase):
    def __init__(self, n):
        self.left = n

    def readable(self):
        return True

    def readinto(self, buf):
        n = min(len(buf), self.left)
        if n == 0:
            return 0
        buf[:n] = os.urandom(n)
        self.left -= n
        return n


def cmd_make_layout(layout, layers, layer_size):
    layers, layer_size = int(layers), int(layer_size)
    os.makedirs(os.path.join(layout, "blobs", "sha256"), exist_ok=True)
    layer_descs, diff_ids = [], []
    for i in range(layers):
        tmp = os.path.join(layout, f".layer-{i}.tmp")
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
            ti = tarfile.TarInfo(f"data/layer-{i}.bin")
            ti.size = layer_size
            ti.mode = 0o644
            ti.mtime = 1700000000
            tf.addfile(ti, io.BufferedReader(RandomReader(layer_size), CHUNK))
        digest, size = write_blob_file(layout, tmp)
        # Uncompressed layers: the diff_id is the layer digest itself.
        diff_ids.append(digest)
        layer_descs.append({"mediaType": OCI_LAYER_TAR, "digest": digest, "size": size})
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "2024-01-01T00:00:00Z",
        "config": {"Cmd": ["/bin/true"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": f"berth bench layer {i}"}
                    for i in range(layers)],
    }
    cdigest, csize = write_blob_bytes(layout, json.dumps(config, separators=(",", ":")).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": cdigest, "size": csize},
        "layers": layer_descs,
    }
    mdigest, msize = write_blob_bytes(layout, json.dumps(manifest, separators=(",", ":")).encode())
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{
            "mediaType": OCI_MANIFEST, "digest": mdigest, "size": msize,
            "annotations": {"org.opencontainers.image.ref.name": "latest"},
        }],
    }
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump(index, f)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    print(mdigest, sum(d["size"] for d in layer_descs))


def cmd_push_small(base, name, tag):
    layer_buf = io.BytesIO()
    with tarfile.open(fileobj=layer_buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        payload = b"hello from the berth benchmark\n" * 32
        ti = tarfile.TarInfo("hello.txt")
        ti.size = len(payload)
        ti.mtime = 1700000000
        tf.addfile(ti, io.BytesIO(payload))
    layer = layer_buf.getvalue()
    layer_digest = push_blob_bytes(base, name, layer)
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }, separators=(",", ":")).encode()
    config_digest = push_blob_bytes(base, name, config)
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER_TAR, "digest": layer_digest, "size": len(layer)}],
    }, separators=(",", ":")).encode()
    mdigest = sha256_digest(manifest)
    p = f"/v2/{name}/manifests/{tag}"
    st, h, b = request(base, "PUT", p, body=manifest, headers={"Content-Type": OCI_MANIFEST})
    if st != 201:
        fail("manifest push failed: " + describe("PUT", p, st, h, b))
    got = h.get("docker-content-digest")
    if got and got != mdigest:
        fail(f"PUT {p}: Docker-Content-Digest {got} != expected {mdigest}")
    print(mdigest)


def cmd_check_manifest(base, name, ref, digest):
    p = f"/v2/{name}/manifests/{ref}"
    st, h, b = request(base, "GET", p, headers={"Accept": OCI_MANIFEST})
    if st != 200:
        fail(describe("GET", p, st, h, b))
    if sha256_digest(b) != digest:
        fail(f"GET {p}: body digest {sha256_digest(b)} != pushed digest {digest}")
    ct = (h.get("content-type") or "").split(";")[0].strip()
    if ct != OCI_MANIFEST:
        fail(f"GET {p}: Content-Type {ct!r}, expected {OCI_MANIFEST!r}")
    got = h.get("docker-content-digest")
    if got and got != digest:
        fail(f"GET {p}: Docker-Content-Digest {got} != {digest}")


def cmd_check_blob(base, name, digest, size):
    p = f"/v2/{name}/blobs/{digest}"
    c = conn_for(base, timeout=120)
    try:
        c.request("GET", p)
        r = c.getresponse()
        if r.status != 200:
            body = r.read()
            fail(describe("GET", p, r.status, {k.lower(): v for k, v in r.getheaders()}, body))
        h = hashlib.sha256()
        n = 0
        while True:
            b = r.read(8 * CHUNK)
            if not b:
                break
            h.update(b)
            n += len(b)
    except OSError as e:
        fail(f"GET {base}{p}: {e}")
    finally:
        c.close()
    if n != int(size) or "sha256:" + h.hexdigest() != digest:
        fail(f"GET {p}: got {n} bytes with digest sha256:{h.hexdigest()}, expected {size} bytes {digest}")


def curl(args):
    p = subprocess.run(["curl", "-sS", "--noproxy", "*", "-o", "/dev/null", "-D", "-"] + args,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if p.returncode != 0:
        fail(f"curl {' '.join(args)} failed (exit {p.returncode}): {p.stderr.decode().strip()}")
    # -D - may contain several header blocks (e.g. "100 Continue"); keep the last one.
    blocks = [b for b in re.split(r"\r?\n\r?\n", p.stdout.decode("iso-8859-1")) if b.strip()]
    if not blocks:
        fail(f"curl {' '.join(args)}: no response headers")
    lines = blocks[-1].splitlines()
    m = re.match(r"HTTP/\S+\s+(\d+)", lines[0])
    if not m:
        fail(f"curl {' '.join(args)}: unparsable status line {lines[0]!r}")
    hdrs = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            hdrs[k.strip().lower()] = v.strip()
    return int(m.group(1)), hdrs


def upload_one(base, name, path, digest):
    st, h = curl(["-X", "POST", "-H", "Content-Length: 0", f"{base}/v2/{name}/blobs/uploads/"])
    if st != 202:
        fail(f"POST {base}/v2/{name}/blobs/uploads/ -> HTTP {st}, expected 202")
    put = base + add_query(location_to_path(base, h.get("location")), "digest", digest)
    st, h = curl(["-X", "PUT", "--upload-file", path, "-H", "Content-Type: application/octet-stream",
                  "-H", "Expect:", put])
    if st != 201:
        fail(f"PUT {put} ({os.path.getsize(path)} bytes) -> HTTP {st}, expected 201")
    got = h.get("docker-content-digest")
    if got and got != digest:
        fail(f"PUT {put}: Docker-Content-Digest {got} != {digest}")
    return os.path.getsize(path)


def cmd_upload(base, name, parallel, listfile):
    items = []
    with open(listfile) as f:
        for line in f:
            if line.strip():
                path, digest, _size = line.split()
                items.append((path, digest))
    if not items:
        fail(f"{listfile}: no files to upload")
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=int(parallel)) as ex:
        sizes = list(ex.map(lambda it: upload_one(base, name, it[0], it[1]), items))
    dt = time.monotonic() - t0
    # Spot-check that the last blob is really there with the right size.
    path, digest = items[-1]
    st, h, _ = request(base, "HEAD", f"/v2/{name}/blobs/{digest}")
    if st != 200 or h.get("content-length") != str(os.path.getsize(path)):
        fail(f"HEAD /v2/{name}/blobs/{digest} after upload -> HTTP {st}, "
             f"Content-Length {h.get('content-length')!r}, expected 200 and {os.path.getsize(path)}")
    print(f"{dt:.6f} {sum(sizes)}")


UNITS = {"B": 1, "KB": 1024, "MB": 1024 ** 2, "GB": 1024 ** 3, "TB": 1024 ** 4}


def cmd_gen_garbage(base, name, count):
    """Uploads COUNT distinct 1 KiB blobs that no manifest references, 8 at
    a time on keep-alive connections; prints blobs/s."""
    count = int(count)
    host, port = split_url(base)
    auth = os.environ.get("BENCH_AUTH")

    def worker(start):
        c = http.client.HTTPConnection(host, port, timeout=60)
        for i in range(start, count, 8):
            data = i.to_bytes(8, "big") * 128
            digest = sha256_digest(data)
            headers = {"Content-Length": "0"}
            if auth:
                headers["Authorization"] = auth
            c.request("POST", f"/v2/{name}/blobs/uploads/", headers=headers)
            r = c.getresponse()
            r.read()
            if r.status != 202:
                fail(f"POST upload: HTTP {r.status}")
            put = add_query(location_to_path(base, r.getheader("location")), "digest", digest)
            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(len(data))}
            if auth:
                headers["Authorization"] = auth
            c.request("PUT", put, body=data, headers=headers)
            r = c.getresponse()
            r.read()
            if r.status != 201:
                fail(f"PUT upload: HTTP {r.status}")
        c.close()

    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for f in [pool.submit(worker, s) for s in range(8)]:
            f.result()
    print(f"{count / (time.time() - t0):.0f}")


def cmd_push_latency(base, name, count, out):
    """Pushes COUNT small images (config, one 4 KiB layer, manifest) one
    after another; writes each push's milliseconds to OUT and prints p99."""
    count = int(count)
    times = []
    for i in range(count):
        seed = os.urandom(16)
        layer = seed * 256
        config = json.dumps({"architecture": "amd64", "os": "linux", "seed": seed.hex()}).encode()
        t0 = time.perf_counter()
        push_blob_bytes(base, name, layer)
        push_blob_bytes(base, name, config)
        manifest = json.dumps({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": sha256_digest(config), "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": sha256_digest(layer), "size": len(layer)}],
        }).encode()
        st, h, b = request(base, "PUT", f"/v2/{name}/manifests/t{i}", body=manifest,
                           headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
        if st != 201:
            fail("manifest push failed: " + describe("PUT", f"/v2/{name}/manifests/t{i}", st, h, b))
        times.append((time.perf_counter() - t0) * 1000)
    with open(out, "w") as f:
        f.write("\n".join(f"{t:.3f}" for t in times) + "\n")
    times.sort()
    print(f"{times[min(len(times) - 1, int(len(times) * 0.99))]:.1f}")


def cmd_wrk_parse(path):
    text = open(path).read()
    m = re.search(r"Requests/sec:\s*([\d.]+)", text)
    t = re.search(r"Transfer/sec:\s*([\d.]+)([KMGT]?B)", text)
    n = re.search(r"(\d+) requests in", text)
    if not (m and t and n):
        fail(f"cannot parse wrk output {path}:\n{text}")
    non2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    errors = sum(int(x) for x in sock.groups()[:3]) if sock else 0  # timeouts are reported, not fatal
    print(m.group(1), float(t.group(1)) * UNITS[t.group(2)], n.group(1),
          non2xx.group(1) if non2xx else 0, errors)


# ---------------------------------------------------------------- rendering

# key -> (label, unit, higher_is_better, format)
METRICS = [
    ("manifest_tag_rps", "manifest GET by tag", "req/s", True, "{:,.0f}"),
    ("manifest_digest_rps", "manifest GET by digest", "req/s", True, "{:,.0f}"),
    ("manifest_tag_public_rps", "authentication on: manifest GET by tag, anonymous (public repository), median of 3", "req/s", True, "{:,.0f}"),
    ("manifest_tag_basic_rps", "authentication on: manifest GET by tag, Basic (htpasswd, bcrypt cost 5), median of 3", "req/s", True, "{:,.0f}"),
    ("manifest_tag_bearer_rps", "authentication on: manifest GET by tag, Bearer token, median of 3", "req/s", True, "{:,.0f}"),
    ("blob_get_gbps", "blob GET 64 MiB, wrk Transfer/sec", "GB/s", True, "{:.2f}"),
    ("blob_get_rps_gbps", "blob GET 64 MiB, req/s × 64 MiB", "GB/s", True, "{:.2f}"),
    ("blob_get8_gbps", "blob GET 64 MiB, 8 connections, wrk Transfer/sec", "GB/s", True, "{:.2f}"),
    ("upload_seq_mbps", "monolithic upload 64 MiB, sequential", "MB/s", True, "{:,.0f}"),
    ("disk_fsync_mbps", "the disk under the storage: dd 64 MiB conv=fsync, median of 3, just before the uploads", "MB/s", True, "{:,.0f}"),
    ("upload_seq_vs_disk", "monolithic upload 64 MiB, sequential, ÷ that dd rate", "×", True, "{:.2f}"),
    ("upload_par_mbps", "monolithic upload 64 MiB, 4 parallel", "MB/s", True, "{:,.0f}"),
    ("skopeo_push_s", "skopeo push {image}", "s", False, "{:.2f}"),
    ("skopeo_pull_s", "skopeo pull {image}", "s", False, "{:.2f}"),
    ("peak_rss_mib", "server peak RSS (VmHWM)", "MiB", False, "{:,.0f}"),
    ("gc_blobs_per_s", "garbage collection: unreferenced 1 KiB blobs removed per second (berth online, distribution offline)", "blobs/s", True, "{:,.0f}"),
    ("push_p99_idle_ms", "small image push p99, nothing else running", "ms", False, "{:.1f}"),
    ("push_p99_during_gc_ms", "small image push p99 while garbage collection runs (distribution cannot)", "ms", False, "{:.1f}"),
]


def cmd_render(results_tsv, meta_tsv, out):
    res = {}
    with open(results_tsv) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) == 3:
                res[(parts[0], parts[1])] = parts[2]
    meta = []
    with open(meta_tsv) as f:
        for line in f:
            if "\t" in line:
                k, v = line.rstrip("\n").split("\t", 1)
                meta.append((k, v))
    md = dict(meta)
    image = md.get("skopeo image", "image")

    def cell(key, reg, fmt):
        v = res.get((key, reg))
        if v is None:
            return None, "—"
        try:
            x = float(v)
        except ValueError:
            return None, v  # e.g. "FAILED"
        return x, fmt.format(x)

    header = ["metric", "unit", "berth", "distribution", "ratio (>1 = berth better)"]
    rows = []
    for key, label, unit, higher, fmt in METRICS:
        bv, bs = cell(key, "berth", fmt)
        dv, ds = cell(key, "distribution", fmt)
        if bv is not None and dv is not None and bv > 0 and dv > 0:
            r = bv / dv if higher else dv / bv
            rs = f"{r:.2f}× ({'berth/dist' if higher else 'dist/berth'})"
        else:
            rs = "—"
        hint = "higher is better" if higher else "lower is better"
        rows.append([label.format(image=image), f"{unit} ({hint})", bs, ds, rs])

    # Plain-text table for the terminal.
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) if i in (2, 3) else c.ljust(widths[i])
                               for i, c in enumerate(r))
    print(line(header))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))

    mdl = ["# Berth benchmark results", ""]
    mdl.append("| " + " | ".join(header) + " |")
    mdl.append("|" + "|".join(["---", "---", "---:", "---:", "---:"]) + "|")
    for r in rows:
        mdl.append("| " + " | ".join(r) + " |")
    anon = res.get(("manifest_tag_public_rps", "berth"))
    cost = []
    for key, what in (("manifest_tag_basic_rps", "Basic credentials (remembered after the first bcrypt check)"), ("manifest_tag_bearer_rps", "a Bearer token")):
        v = res.get((key, "berth"))
        try:
            cost.append(f"Berth with {what}: {float(v) / float(anon):.2f}× of anonymous on the same instance.")
        except (TypeError, ValueError, ZeroDivisionError):
            pass
    if cost:
        mdl += [""] + cost
    mdl += ["",
            "Ratio: for throughput metrics berth/distribution, for times and memory "
            "distribution/berth, so a ratio above 1 always means Berth did better.",
            "GB/s and MB/s are decimal (10^9 / 10^6 bytes per second).", "",
            "## Environment", ""]
    for k, v in meta:
        mdl.append(f"- **{k}**: {v}")
    mdl.append("")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write("\n".join(mdl))


def main(argv):
    cmds = {
        "freeport": (cmd_freeport, 0),
        "wait-v2": (cmd_wait_v2, 2),
        "gen-blobs": (cmd_gen_blobs, 3),
        "make-layout": (cmd_make_layout, 3),
        "push-small": (cmd_push_small, 3),
        "check-manifest": (cmd_check_manifest, 4),
        "check-blob": (cmd_check_blob, 4),
        "upload": (cmd_upload, 4),
        "wrk-parse": (cmd_wrk_parse, 1),
        "gen-garbage": (cmd_gen_garbage, 3),
        "push-latency": (cmd_push_latency, 4),
        "render": (cmd_render, 3),
    }
    if len(argv) < 2 or argv[1] not in cmds:
        print(__doc__, file=sys.stderr)
        return 2
    fn, nargs = cmds[argv[1]]
    if len(argv) - 2 != nargs:
        print(f"bench_tools.py {argv[1]}: expected {nargs} arguments, got {len(argv) - 2}", file=sys.stderr)
        return 2
    try:
        fn(*argv[2:])
    except BenchError as e:
        print(f"bench_tools.py {argv[1]}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
