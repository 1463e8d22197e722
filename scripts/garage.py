#!/usr/bin/env python3
"""Garage (S3) on loopback for Berth's tests and drills.

  garage.py config --dir D --zones a,b,c   write one config per zone (free ports)
  garage.py setup  --dir D                 once the daemons run: connect them,
                                           assign the layout, create the bucket
                                           and key; writes D/s3.env

The caller starts and stops the daemons (`garage -c D/<zone>/garage.toml
server`), so a test can kill and restart them. Every node fsyncs metadata and
data (Garage's default does not), and the replication factor is the number
of zones, up to 3. Credentials are fixed so that a test can know them.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time

KEY_ID = "GK0123456789abcdef01234567"
SECRET = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
RPC_SECRET = "4f7a1c5e9b2d8f3a6c0e1b4d7a9f2c5e8b1d4a7f0c3e6b9d2a5f8c1e4b7d0a3f"
BUCKET = "berth"
REGION = "garage"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def garage_bin():
    for candidate in [os.environ.get("GARAGE_BIN"), os.path.expanduser("~/.cargo/bin/garage")]:
        if candidate and os.path.exists(candidate):
            return candidate
    return "garage"


def cmd_config(args):
    zones = [z for z in args.zones.split(",") if z]
    replication = min(3, len(zones))
    nodes = []
    for zone in zones:
        d = os.path.join(args.dir, zone)
        os.makedirs(os.path.join(d, "meta"), exist_ok=True)
        os.makedirs(os.path.join(d, "data"), exist_ok=True)
        rpc, s3, admin = free_port(), free_port(), free_port()
        config = os.path.join(d, "garage.toml")
        with open(config, "w") as f:
            f.write(f"""metadata_dir = "{d}/meta"
data_dir = "{d}/data"
db_engine = "sqlite"
metadata_fsync = true
data_fsync = true
replication_factor = {replication}
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{RPC_SECRET}"

[s3_api]
s3_region = "{REGION}"
api_bind_addr = "127.0.0.1:{s3}"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:{admin}"
""")
        nodes.append({"zone": zone, "config": config, "rpc_port": rpc, "s3_port": s3})
    with open(os.path.join(args.dir, "cluster.json"), "w") as f:
        json.dump({"nodes": nodes, "replication": replication}, f)
    print(json.dumps({"nodes": nodes}))


def garage(config, *argv, check=True):
    r = subprocess.run([garage_bin(), "-c", config, *argv], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"garage {' '.join(argv)} failed: {r.stdout}{r.stderr}")
    return r


def retry(what, f, timeout=30):
    deadline = time.time() + timeout
    while True:
        try:
            return f()
        except RuntimeError as e:
            if time.time() > deadline:
                raise RuntimeError(f"{what}: {e}")
            time.sleep(0.3)


def cmd_setup(args):
    with open(os.path.join(args.dir, "cluster.json")) as f:
        cluster = json.load(f)
    nodes = cluster["nodes"]
    first = nodes[0]["config"]
    ids = []
    for node in nodes:
        out = retry("node id", lambda: garage(node["config"], "node", "id", "-q").stdout.strip())
        ids.append(out)
    for node_id in ids[1:]:
        retry("connect", lambda: garage(first, "node", "connect", node_id))
    for node, node_id in zip(nodes, ids):
        short = node_id.split("@")[0][:16]
        retry("layout assign", lambda: garage(first, "layout", "assign", "-z", node["zone"], "-c", "1G", short))
    retry("layout apply", lambda: garage(first, "layout", "apply", "--version", "1"))
    retry("key import", lambda: garage(first, "key", "import", "--yes", "-n", "berth", KEY_ID, SECRET))
    retry("bucket create", lambda: garage(first, "bucket", "create", BUCKET))
    retry("bucket allow", lambda: garage(first, "bucket", "allow", "--read", "--write", "--owner", BUCKET, "--key", "berth"))
    env = {
        "AWS_ACCESS_KEY_ID": KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_REGION": REGION,
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{nodes[0]['s3_port']}",
        # Garage does not set TCP_NODELAY: on a reused connection each read
        # waits 40 ms for a delayed ACK (docs/cluster.md).
        "BERTH_STORAGE_REUSE_CONNECTIONS": "false",
    }
    with open(os.path.join(args.dir, "s3.env"), "w") as f:
        for k, v in env.items():
            f.write(f"export {k}={v}\n")
    print(json.dumps({"bucket": BUCKET, "env": env}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("config")
    c.add_argument("--dir", required=True)
    c.add_argument("--zones", default="a")
    s = sub.add_parser("setup")
    s.add_argument("--dir", required=True)
    args = p.parse_args()
    try:
        {"config": cmd_config, "setup": cmd_setup}[args.command](args)
    except RuntimeError as e:
        print(f"garage.py: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
