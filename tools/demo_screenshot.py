"""Screenshot of the comparison page (demo.py) in headless Chromium, as the README shows it, and how long the
page takes to show our side again after the quality slider moves.

  python tools/demo_screenshot.py --image PHOTO --out docs/demo.png
  python tools/demo_screenshot.py --image kodim23.png --measure 8    # + slider-to-picture times

Needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver) and selenium.
"""
import argparse
import os
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from runtime import HelpFormatter  # noqa: E402

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Chromium reaches for Google's servers at start unless told not to; on a closed network that only fails.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
         "--disable-background-networking", "--disable-component-update", "--disable-dev-shm-usage")


def chromium(width=1400, height=900):
    """A headless Chromium driven by Selenium through Debian's chromedriver."""
    import tempfile

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + (f"--window-size={width},{height}", f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def serve(app):
    """Serve a WSGI app on a free loopback port in a background thread; (server, base URL)."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}/"


def wait_for(driver, script, timeout=120):
    """Wait until a JavaScript expression is truthy in the page; its value."""
    end = time.time() + timeout
    while time.time() < end:
        value = driver.execute_script(f"return {script}")
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"page never got to: {script}")


def measure_slider(driver, moves):
    """Move the quality slider `moves` times (alternating qualities, waiting for the classic side each time) and
    print how long each move took until our new picture had loaded in the page, and their median."""
    wait_for(driver, "!document.getElementById('right-stats').classList.contains('busy')")
    times = []
    for i in range(moves):
        quality = 2 + (3 * i) % 6 + 0.25 * (i % 4)  # a new value every time
        ms = driver.execute_script(
            "const img = document.getElementById('left-img'), q = document.getElementById('quality');"
            "window.__shown = null; const t0 = performance.now();"
            "img.addEventListener('load', () => { window.__shown = performance.now() - t0; }, { once: true });"
            f"q.value = {quality}; q.dispatchEvent(new Event('change')); return 0;")
        ms = wait_for(driver, "window.__shown")
        times.append(ms / 1000)
        wait_for(driver, "!document.getElementById('right-stats').classList.contains('busy')")
        print(f"quality {quality}: our picture shown {times[-1]:.2f} s after the slider moved")
    print(f"median of {moves}: {sorted(times)[len(times) // 2]:.2f} s")


def main(argv=None):
    """Start the page with the shipped model, upload a photo, wait for both sides, save the screenshot."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--image", required=True, help="photo to show")
    p.add_argument("--out", default="demo_screenshot.png",
                   help="PNG to write (the README's picture is docs/demo.png: name it to replace that)")
    p.add_argument("--quality", type=float, default=3, help="our quality on the slider")
    p.add_argument("--codec", default="avif", help="classic codec on the right")
    p.add_argument("--measure", type=int, default=0,
                   help="then move the quality slider this many times and time each move until our new picture is shown")
    p.add_argument("--weights", default=None, help="our checkpoint (default: the shipped default model)")
    args = p.parse_args(argv)
    import demo
    import qae

    server, url = serve(demo.create_app(qae.Codec(args.weights)))
    driver = chromium()
    try:
        driver.get(url)
        wait_for(driver, "document.getElementById('codec').options.length > 0")
        driver.execute_script(f"const q = document.getElementById('quality'); q.value = {args.quality};"
                              "q.dispatchEvent(new Event('input'));"
                              f"document.getElementById('codec').value = '{args.codec}';")
        driver.find_element("id", "file").send_keys(os.path.abspath(args.image))
        wait_for(driver, "document.getElementById('right-stats').dataset.bytes")
        wait_for(driver, "document.getElementById('right-img').complete && document.getElementById('right-img').naturalWidth")
        driver.save_screenshot(args.out)
        print("wrote", args.out)
        if args.measure:
            measure_slider(driver, args.measure)
    finally:
        driver.quit()
        server.shutdown()


if __name__ == "__main__":
    main()
