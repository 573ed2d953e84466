"""The web app served (``df2_jax.app.launch``): scripts through ``gradio_client``, two visitors at
once, bad uploads answered while the server keeps serving, and a real headless Chromium that
uploads a photo and sees the drawn garments and the shop strip.

The browser steps (``browse``) also make the README's screenshot of the demo run:

  python -m df2_jax.app --workdir runs/demo --index runs/demo/shop_index &
  python tests/system/test_app_server.py --url http://127.0.0.1:7860/ \\
      --photo data/synthetic/s0_t1800_v50_px128_g2/validation/image/000076.jpg \\
      --screenshot docs/images/app.jpg
"""

import argparse
import concurrent.futures
import io
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  """The test run's app served on a free port of 127.0.0.1 with a 1 MB upload limit."""
  from conftest import make_app_world
  from df2_jax import app as app_lib
  world = make_app_world(tmp_path_factory.mktemp("app_server"))
  app = app_lib.PhotoApp.from_workdir(
      str(world["workdir"]), index_dir=str(world["index"]), top=3, min_score=0.0,
      examples=app_lib.demo_examples(world["config"]))
  port = _free_port()
  page = app_lib.launch(app, port=port, max_file_mb=1, block=False)
  yield dict(world, app=app, url=f"http://127.0.0.1:{port}/")
  page.close()


def _client(url):
  from gradio_client import Client
  return Client(url, verbose=False)


def _detect(client, path):
  from gradio_client import handle_file
  return client.predict(handle_file(str(path)), api_name="/detect")


def test_a_script_detects_through_the_api(served):
  photo = served["images"] / "000002.jpg"
  picture, table, garment, matches, result, status = _detect(_client(served["url"]), photo)
  want = served["app"].answer(str(photo)).result
  for key in ("boxes", "scores", "names", "category_ids", "masks", "landmarks", "matches"):
    assert result[key] == want[key], key
  n = len(want["boxes"])
  assert n > 0 and status.startswith(f"000002.jpg: {n} garment(s) in ")
  assert [row[1] for row in table["data"]] == want["names"]
  assert garment["value"].startswith(f"1: {want['names'][0]} ")
  # The first garment's shop strip: its top 3, each with rank, probability and source file.
  assert [m["caption"] for m in matches] == [
      f"#{r['rank']} {r['match_score']:.3f} {os.path.basename(r['image'])}"
      for r in want["matches"][0]]
  assert all(Path(m["image"]).stat().st_size > 0 for m in matches)
  assert Path(picture).stat().st_size > 0


def test_two_visitors_at_once_are_both_answered(served):
  photos = [served["images"] / "000004.jpg", served["images"] / "000006.jpg"]
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    answers = list(pool.map(lambda p: _detect(_client(served["url"]), p), photos))
  for photo, answer in zip(photos, answers):
    assert answer[5].startswith(f"{photo.name}: ") and answer[4]["boxes"], answer[5]


def test_bad_uploads_leave_the_server_answering(served, tmp_path):
  from conftest import write_huge_png  # the 20000 x 20000 PNG, a few hundred KB
  client = _client(served["url"])
  good = served["images"] / "000002.jpg"
  want = _detect(client, good)[4]["boxes"]
  (tmp_path / "notes.jpg").write_text("not a photo")
  (tmp_path / "empty.png").write_bytes(b"")
  write_huge_png(tmp_path / "huge.png", 20000, 20000)
  for name, words in [("notes.jpg", "notes.jpg is not an image this server can read"),
                      ("empty.png", "empty.png is an empty file"),
                      ("huge.png", "huge.png has too many pixels")]:
    answer = _detect(client, tmp_path / name)
    assert answer[5].startswith(words) and answer[0] is None, answer[5]
    assert _detect(client, good)[4]["boxes"] == want
  # Over the upload limit (1 MB here): refused by Gradio before it lands.
  (tmp_path / "big.jpg").write_bytes(b"\xff\xd8" + os.urandom(1_200_000))
  with pytest.raises(Exception, match="(?i)exceeds|too large|maximum"):
    _detect(client, tmp_path / "big.jpg")
  assert _detect(client, good)[4]["boxes"] == want


# ---------------------------------------------------------------------------------------------
# A real browser.


def _chromium() -> tuple[str, str] | None:
  """(browser, chromedriver) paths of the distribution's Chromium, or None."""
  browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                  if shutil.which(n)), None)
  driver = shutil.which("chromedriver")
  return (browser, driver) if browser and driver else None


def browse(url: str, photo: str, screenshot: str, timeout_s: float = 180) -> dict:
  """Opens the page in headless Chromium, uploads ``photo``, waits for the drawn photo and the
  shop strip, saves a screenshot (PNG, or JPEG by its extension), then selects the second
  garment; returns what the page shows: {status, table, captions, drawn, second_captions (the
  second garment's strip; None with one garment)}."""
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import WebDriverWait
  browser, driver_path = _chromium()
  options = webdriver.ChromeOptions()
  options.binary_location = browser
  for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1280,1300"):
    options.add_argument(arg)
  driver = webdriver.Chrome(service=Service(driver_path), options=options)
  try:
    driver.get(url)
    wait = WebDriverWait(driver, timeout_s)
    upload = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#photo input[type=file]"))
    upload[0].send_keys(os.path.abspath(photo))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#drawn img")
               and d.find_elements(By.CSS_SELECTOR, "#matches img")
               and "garment" in d.find_element(By.ID, "status").text)
    time.sleep(1.0)  # the thumbnails' pixels, for the screenshot
    shown = {"status": driver.find_element(By.ID, "status").text,
             "table": driver.find_element(By.ID, "garments").text,
             "captions": [e.get_attribute("alt")
                          for e in driver.find_elements(By.CSS_SELECTOR, "#matches img")],
             "drawn": [e.get_attribute("src") for e in driver.find_elements(By.CSS_SELECTOR,
                                                                             "#drawn img")]}
    os.makedirs(os.path.dirname(os.path.abspath(screenshot)), exist_ok=True)
    png = driver.get_screenshot_as_png()
    if screenshot.lower().endswith((".jpg", ".jpeg")):  # the README's, a tenth of the PNG
      from PIL import Image
      with Image.open(io.BytesIO(png)) as image:
        image.convert("RGB").save(screenshot, quality=85, optimize=True)
    else:
      Path(screenshot).write_bytes(png)
    # The second garment selected: its own shop strip replaces the first's.
    shown["second_captions"] = None
    driver.find_element(By.CSS_SELECTOR, "#garment input").click()
    options = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#garment ul li"))
    if len(options) > 1:
      options[1].click()
      wait.until(lambda d: [e.get_attribute("alt") for e in d.find_elements(
          By.CSS_SELECTOR, "#matches img")] != shown["captions"])
      shown["second_captions"] = [e.get_attribute("alt") for e in driver.find_elements(
          By.CSS_SELECTOR, "#matches img")]
    return shown
  finally:
    driver.quit()


def test_a_browser_uploads_a_photo_and_sees_its_garments_and_matches(served, tmp_path):
  if _chromium() is None:
    pytest.skip("no Chromium and chromedriver here (apt-get install chromium chromium-driver; "
                ".ci/run installs them)")
  photo = served["images"] / "000002.jpg"
  want = served["app"].answer(str(photo)).result
  shot = tmp_path / "page.png"
  shown = browse(served["url"], str(photo), str(shot))
  assert shown["status"].startswith(f"000002.jpg: {len(want['boxes'])} garment(s) in ")
  for name in want["names"]:
    assert name in shown["table"]
  assert shown["captions"][:3] == [
      f"#{r['rank']} {r['match_score']:.3f} {os.path.basename(r['image'])}"
      for r in want["matches"][0]]
  assert shown["drawn"] and shown["drawn"][0]
  assert len(want["matches"]) > 1 and shown["second_captions"][:3] == [
      f"#{r['rank']} {r['match_score']:.3f} {os.path.basename(r['image'])}"
      for r in want["matches"][1]]
  from PIL import Image
  with Image.open(shot) as image:
    assert image.size[0] >= 1000 and image.getextrema() != ((0, 0), (0, 0), (0, 0))


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description="The browser test's steps against a served app.")
  parser.add_argument("--url", default="http://127.0.0.1:7860/")
  parser.add_argument("--photo", required=True)
  parser.add_argument("--screenshot", required=True)
  args = parser.parse_args()
  print(browse(args.url, args.photo, args.screenshot))
