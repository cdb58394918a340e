"""The comparison page (demo.py): its JSON API, and the page itself driven in headless Chromium."""
import io
import os
import shutil
import sys
import urllib.request

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, photo_like

sys.path.insert(0, os.path.join(ROOT, "tools"))
import demo  # noqa: E402
import demo_screenshot as browser  # noqa: E402
import qae  # noqa: E402


@pytest.fixture(scope="module")
def app(hyper_ckpt):
    """The page's Flask app around a tiny hyper model."""
    return demo.create_app(qae.Codec(hyper_ckpt), max_upload_mb=1)


def png_file(rgb):
    """PNG bytes of an array."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


def test_api_codes_both_sides_and_matches_the_size(app):
    """Upload → ours → the classic codec matched in bytes; the files served are the bytes reported."""
    client = app.test_client()
    up = client.post("/api/image", data={"file": (io.BytesIO(png_file(photo_like(96, 128))), "p.png")}).get_json()
    ours = client.post("/api/ours", json={"token": up["token"], "quality": 5, "effort": 0}).get_json()
    assert ours["bytes"] == len(client.get(f"/api/file/{up['token']}/ours.qae").data)
    right = client.post("/api/classic", json={"token": up["token"], "codec": "jpeg420", "target_bytes": ours["bytes"]}).get_json()
    assert right["bytes"] == len(client.get(f"/api/file/{up['token']}/classic.jpg").data)
    sizes = [len(demo.code_classic("jpeg420", photo_like(96, 128), s)[0]) for s in range(1, 101)]
    assert abs(right["bytes"] - ours["bytes"]) == min(abs(s - ours["bytes"]) for s in sizes)  # the closest setting
    decoded = np.asarray(Image.open(io.BytesIO(client.get(f"/api/file/{up['token']}/ours.png").data)))
    assert decoded.shape == (96, 128, 3)


def test_api_errors_are_messages_and_the_server_keeps_serving(app):
    """Not an image, too large, truncated, unknown token, bad effort: a JSON error each; then it still works."""
    client = app.test_client()
    cases = [(b"hello", 400, "not an image"), (b"\0" * (2 << 20), 413, "larger than"),
             (png_file(photo_like(40, 40))[:60], 400, "")]
    for data, status, words in cases:
        r = client.post("/api/image", data={"file": (io.BytesIO(data), "x.png")})
        assert r.status_code == status and words in r.get_json()["error"]
    assert client.post("/api/ours", json={"token": "nope"}).status_code == 404
    up = client.post("/api/image", data={"file": (io.BytesIO(png_file(photo_like(32, 32))), "p.png")}).get_json()
    assert client.post("/api/ours", json={"token": up["token"], "effort": 9}).status_code == 400
    assert client.post("/api/ours", json={"token": up["token"], "quality": 2, "effort": 0}).status_code == 200


def have_browser():
    """True when Debian's chromium and chromedriver are installed."""
    return all(shutil.which(p) for p in (browser.CHROMIUM, browser.CHROMEDRIVER))


@pytest.mark.skipif(not have_browser() and not os.environ.get("QAE_REQUIRE_BROWSER"),
                    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
def test_page_in_a_real_browser(app, tmp_path):
    """Headless Chromium: no image before an upload, then both panes show images, the quality slider recodes, the sizes on the page are
    the bytes the API serves, a bad upload shows a message."""
    photo = tmp_path / "photo.png"
    photo.write_bytes(png_file(photo_like(120, 160, 3)))
    server, url = browser.serve(app)
    driver = browser.chromium()
    try:
        driver.get(url)
        browser.wait_for(driver, "document.getElementById('codec').options.length > 0")
        for img in ("left-img", "right-img"):  # no photo yet: nothing drawn, no broken-image text
            assert driver.execute_script(f"return getComputedStyle(document.getElementById('{img}')).display") == "none"
        driver.find_element("id", "file").send_keys(str(photo))
        browser.wait_for(driver, "document.getElementById('right-stats').dataset.bytes")
        first = driver.execute_script("return document.getElementById('left-stats').dataset.bytes")
        slider = driver.find_element("id", "quality")
        driver.execute_script("arguments[0].value = 7; arguments[0].dispatchEvent(new Event('change'))", slider)
        browser.wait_for(driver, f"document.getElementById('left-stats').dataset.bytes != '{first}' && "
                                 "document.getElementById('left-stats').textContent.includes('quality 7')")
        browser.wait_for(driver, "!document.getElementById('right-stats').classList.contains('busy') && "
                                 "document.getElementById('right-stats').textContent.includes('bytes')")
        for img in ("left-img", "right-img"):
            assert browser.wait_for(driver, f"document.getElementById('{img}').complete && "
                                            f"document.getElementById('{img}').naturalWidth") == 160
        token = driver.execute_script("return token")
        stats = lambda side, key: driver.execute_script(f"return document.getElementById('{side}').dataset.{key}")  # noqa: E731
        for side, name in (("left-stats", "ours.qae"), ("right-stats", stats("right-stats", "file"))):
            assert int(stats(side, "bytes")) == len(urllib.request.urlopen(f"{url}api/file/{token}/{name}").read())
        (tmp_path / "notes.txt").write_text("not an image")
        driver.find_element("id", "file").send_keys(str(tmp_path / "notes.txt"))
        assert "not an image" in browser.wait_for(driver, "document.getElementById('message').textContent.includes('not an image') "
                                                          "&& document.getElementById('message').textContent")
    finally:
        driver.quit()
        server.shutdown()


def test_the_page_refuses_other_origins_hosts_and_odd_requests(hyper_ckpt):
    """Another web page's POST (its Origin), a rebound DNS name (its Host), a header bigger in pixels than allowed,
    a JSON list, settings out of range or of the wrong type: each a 4xx with a message, never a 500; a file name
    with a quote cannot break the download header."""
    app = demo.create_app(qae.Codec(hyper_ckpt), max_upload_mb=1, max_pixels=10_000,
                          allowed_hosts=demo.served_hosts("127.0.0.1", 8000))
    client = app.test_client()
    local = {"base_url": "http://127.0.0.1:8000"}
    png = png_file(photo_like(40, 60))
    r = client.post("/api/image", data={"file": (io.BytesIO(png), "x.png")}, headers={"Origin": "http://evil.example"}, **local)
    assert r.status_code == 403
    assert client.get("/api/codecs", base_url="http://rebound.example:8000").status_code == 403
    big = io.BytesIO()
    Image.new("1", (200, 200)).save(big, "PNG")  # 40,000 pixels in a few hundred bytes
    r = client.post("/api/image", data={"file": (io.BytesIO(big.getvalue()), "b.png")}, **local)
    assert r.status_code == 413 and "pixels" in r.get_json()["error"]
    up = client.post("/api/image", data={"file": (io.BytesIO(png), 'a"b.png')},
                     headers={"Origin": "http://127.0.0.1:8000"}, **local).get_json()
    for path, body in [("/api/ours", [1, 2]), ("/api/ours", {"token": up["token"], "effort": True}),
                       ("/api/ours", {"token": up["token"], "quality": "8"}),
                       ("/api/classic", {"token": up["token"], "codec": "jpeg420", "setting": 100000}),
                       ("/api/classic", {"token": up["token"], "codec": "jpeg420", "target_bytes": -5})]:
        r = client.post(path, json=body, **local)
        assert 400 <= r.status_code < 500 and "error" in r.get_json(), (body, r.status_code)
    assert client.post("/api/ours", json={"token": up["token"], "quality": 3, "effort": 0}, **local).status_code == 200
    r = client.get(f"/api/file/{up['token']}/ours.qae", **local)
    assert r.status_code == 200 and r.headers["Content-Disposition"].startswith('inline; filename="a')
    assert demo.download_name('a"b\r\n; x=1.png') == "a_b____x_1.png"  # the header's quoting cannot be broken
