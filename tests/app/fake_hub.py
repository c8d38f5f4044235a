"""A loopback stand-in for the Hugging Face Hub (the same API subset as crates/models/tests/fake_hub): the
repo info API with sizes and LFS hashes, and `resolve` with range requests and the headers hf-hub reads.
Serves one directory as one repo, slowly enough that a download's progress can be watched."""
import hashlib
import http.server
import json
import os
import threading
import time

COMMIT = "2222222222222222222222222222222222222222"


def serve(repo, directory, chunk_delay=0.02):
    files = {n: open(os.path.join(directory, n), "rb").read()
             for n in sorted(os.listdir(directory)) if not n.startswith("reference")}
    sha = {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}

    class H(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            if self.path.startswith(f"/api/models/{repo}/revision/"):
                body = json.dumps({"id": repo, "sha": COMMIT, "siblings": [
                    {"rfilename": n, "size": len(d), "lfs": {"sha256": sha[n], "size": len(d)}}
                    for n, d in files.items()]}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            prefix = f"/{repo}/resolve/"
            name = self.path[len(prefix):].split("/", 1)[-1] if self.path.startswith(prefix) else None
            if name not in files:
                self.send_response(404)
                self.send_header("content-length", "0")
                self.end_headers()
                return
            data = files[name]
            start, end = 0, len(data) - 1
            rng = self.headers.get("range", "")
            if rng.startswith("bytes="):
                a, b = rng[6:].split("-")
                start, end = int(a), min(int(b or end), len(data) - 1)
            part = data[start:end + 1]
            self.send_response(206 if rng else 200)
            for k, v in [("x-repo-commit", COMMIT), ("etag", f'"{sha[name]}"'), ("x-linked-etag", f'"{sha[name]}"'),
                         ("content-range", f"bytes {start}-{end}/{len(data)}"), ("content-length", str(len(part)))]:
                self.send_header(k, v)
            self.end_headers()
            for i in range(0, len(part), 65536):
                if len(part) > 1:
                    time.sleep(chunk_delay)
                self.wfile.write(part[i:i + 65536])

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{srv.server_address[1]}"
