"""Open a page in headless Chromium and report what it did, as JSON: every request it sent
(through a recording proxy on loopback), every console message, and how much of the
screenshot is drawn. Chromium's own service requests (Google hosts) are reported apart."""

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading

from PIL import Image

OWN_HOSTS = (".google.com", ".googleapis.com", ".gstatic.com", ".gvt1.com")


def proxy(sock, seen):
    while True:
        try:
            conn, _ = sock.accept()
        except OSError:
            return
        try:
            conn.settimeout(2)
            head = conn.recv(4096).decode("latin-1")
            first = head.split("\r\n", 1)[0]
            host = ""
            for line in head.split("\r\n")[1:]:
                if line.lower().startswith("host:"):
                    host = line.split(":", 1)[1].strip().split(":")[0]
            seen.append({"line": first, "host": host})
            conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
        except OSError:
            pass
        finally:
            conn.close()


def main(page, png, width, height):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    seen = []
    threading.Thread(target=proxy, args=(sock, seen), daemon=True).start()
    port = sock.getsockname()[1]
    chromium = os.environ.get("KBCRM_CHROMIUM", "chromium")
    with tempfile.TemporaryDirectory() as profile:
        run = subprocess.run(
            [
                chromium, "--headless", "--no-sandbox", "--disable-gpu",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--disable-quic", "--no-pings",
                "--disable-domain-reliability", "--disable-default-apps",
                f"--user-data-dir={profile}",
                f"--proxy-server=http://127.0.0.1:{port}", "--proxy-bypass-list=<-loopback>",
                "--enable-logging=stderr", "--v=0",
                f"--window-size={width},{height}", f"--screenshot={png}",
                "file://" + os.path.abspath(page),
            ],
            capture_output=True, text=True, timeout=120,
        )
    sock.close()
    console = [l for l in run.stderr.splitlines() if ":CONSOLE" in l]
    img = Image.open(png).convert("RGB")
    small = img.resize((img.width // 4, img.height // 4))
    pixels = [small.getpixel((x, y)) for y in range(small.height) for x in range(small.width)]
    background = max(set(pixels), key=pixels.count)
    ink = sum(1 for p in pixels if p != background) / len(pixels)
    own = [r for r in seen if r["host"].endswith(OWN_HOSTS) or r["host"] == "google.com"]
    page_requests = [r for r in seen if r not in own]
    json.dump({
        "exit": run.returncode,
        "requests": page_requests,
        "browser_requests": len(own),
        "console": console,
        "colors": len(img.getcolors(maxcolors=1 << 24) or []),
        "ink": ink,
        "size": [img.width, img.height],
    }, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
