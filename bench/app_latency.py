"""The web app's answer times: a fresh ``python -m df2_jax.app`` server, then photos through its
API (``gradio_client``), as a visitor's first and later photos.

  python bench/app_latency.py --workdir runs/demo --index runs/demo/shop_index \\
      --photos data/synthetic/s0_t1800_v50_px128_g2/validation/image/000072.jpg \\
               data/synthetic/s0_t1800_v50_px128_g2/validation/image/000076.jpg --starts 3

Each start: the seconds from launching the process to the page answering, then each photo's
round trip through the API and the server's own time for it (the JSON's ``seconds``), and how
many programs it compiled. Prints one line per photo and start, then the medians.
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def one_start(args) -> list[dict]:
  from gradio_client import Client, handle_file
  port = _free_port()
  cmd = [sys.executable, "-m", "df2_jax.app", "--workdir", args.workdir, "--port", str(port)]
  if args.index:
    cmd += ["--index", args.index]
  start = time.perf_counter()
  server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  url = f"http://127.0.0.1:{port}/"
  try:
    while True:
      if server.poll() is not None:
        raise RuntimeError(f"the server exited with {server.returncode}: {' '.join(cmd)}")
      try:
        urllib.request.urlopen(url, timeout=1).read()
        break
      except OSError:
        time.sleep(0.2)
    ready = time.perf_counter() - start
    client = Client(url, verbose=False)
    rows = []
    for n, photo in enumerate(args.photos):
      t = time.perf_counter()
      out = client.predict(handle_file(photo), api_name="/detect")
      rows.append(dict(photo=os.path.basename(photo), nth=n + 1, ready_s=ready,
                       round_trip_s=time.perf_counter() - t, server_s=out[4]["seconds"],
                       compiled=out[4]["compiled_programs"], garments=len(out[4]["boxes"])))
    return rows
  finally:
    server.terminate()
    server.wait(30)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--index")
  parser.add_argument("--photos", nargs="+", required=True)
  parser.add_argument("--starts", type=int, default=3)
  args = parser.parse_args()
  rows = []
  for s in range(args.starts):
    for r in one_start(args):
      rows.append(r)
      print(f"start {s + 1}: ready after {r['ready_s']:.1f} s; photo {r['nth']} {r['photo']}: "
            f"{r['garments']} garment(s), round trip {r['round_trip_s']:.2f} s, server "
            f"{r['server_s']:.2f} s, compiled {r['compiled']}", flush=True)
  print(f"median ready: {statistics.median(r['ready_s'] for r in rows):.1f} s")
  for n in range(1, len(args.photos) + 1):
    mine = [r for r in rows if r["nth"] == n]
    print(f"photo {n}: median round trip {statistics.median(r['round_trip_s'] for r in mine):.2f}"
          f" s, server {statistics.median(r['server_s'] for r in mine):.2f} s, compiled "
          f"{sorted({r['compiled'] for r in mine})}")


if __name__ == "__main__":
  main()
