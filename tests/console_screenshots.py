"""`make screenshots`: a picture of each console page, from a real server on a fresh demo home.

    python -m tests.console_screenshots [--out docs/img]

Starts `seglock serve` on a temporary home (the demo models), drives headless Chromium through
every page at 1280x800 (and the try page at phone width), and writes docs/img/console-*.png as
small palette PNGs. Needs chromium and chromium-driver (apt) and selenium (the dev extra).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from tests.browser_fixtures import chromium, missing_reason, set_viewport, wait_for
from tests.server_fixtures import live_server

PAGES = ("signin", "try", "thief", "models", "tokens", "audit", "metrics")


def save_small(png: bytes, path: Path) -> int:
    """The screenshot as a 256-colour palette PNG (a few tens of KB); returns its size in bytes."""
    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    image.save(path, optimize=True)
    return path.stat().st_size


def shoot(out: Path) -> list[Path]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    out.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory(prefix="seglock-shots-") as tmp:
        with live_server(Path(tmp) / "home") as server, chromium(1280, 800) as driver:
            tokens = json.loads((Path(tmp) / "home" / "initial-tokens.json").read_text())

            def find(element_id: str):
                return driver.find_element(By.ID, element_id)

            def snap(name: str) -> None:
                time.sleep(0.4)  # let layout settle after the last update
                path = out / f"console-{name}.png"
                size = save_small(driver.get_screenshot_as_png(), path)
                written.append(path)
                print(f"{path}  {size // 1024} KiB", flush=True)

            def page(name: str, ready) -> None:
                driver.find_element(By.CSS_SELECTOR, f'#nav a[data-page="{name}"]').send_keys(Keys.ENTER)
                wait_for(lambda: find(f"page-{name}").is_displayed() and ready(), 60, f"the {name} page")

            driver.get(server["base"] + "/ui")
            wait_for(lambda: find("page-signin").is_displayed(), 30, "the sign-in page")
            snap("signin")
            find("token-input").send_keys(tokens["admin"] + Keys.ENTER)
            wait_for(lambda: find("page-try").is_displayed() and find("try-model").get_attribute("value"), 30,
                     "the try page")
            find("try-sample").click()
            wait_for(lambda: find("try-result").is_displayed() and not find("try-busy").is_displayed(), 60, "a mask")
            snap("try")
            page("thief", lambda: find("thief-model").get_attribute("value") == "demo-cp")
            find("thief-sample").click()
            wait_for(lambda: find("thief-result").is_displayed() and not find("thief-busy").is_displayed(), 60,
                     "the thief view")
            snap("thief")
            page("models", lambda: driver.find_elements(By.CSS_SELECTOR, "#models-table tbody tr"))
            snap("models")
            page("tokens", lambda: driver.find_elements(By.CSS_SELECTOR, "#tokens-table tbody tr"))
            snap("tokens")
            page("audit", lambda: driver.find_elements(By.CSS_SELECTOR, "#audit-table tbody tr"))
            snap("audit")
            page("metrics", lambda: driver.find_elements(By.CSS_SELECTOR, "#metrics-models tbody tr"))
            snap("metrics")
            set_viewport(driver, 390, 844)
            page("try", lambda: True)
            find("try-sample").click()
            wait_for(lambda: find("try-result").is_displayed() and not find("try-busy").is_displayed(), 60, "a mask")
            snap("phone")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Screenshot every page of the web console into docs/img/.")
    parser.add_argument("--out", type=Path, default=Path("docs/img"), help="folder for console-*.png (docs/img)")
    args = parser.parse_args(argv)
    reason = missing_reason()
    if reason is not None:
        print(f"screenshots: {reason}", file=sys.stderr)
        return 1
    shoot(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
