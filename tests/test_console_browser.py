"""The web console in a real headless Chromium against a real `seglock serve` on a fresh home.

Run with `pytest -m browser` (or `.ci/browser.sh`, which installs Chromium when it is missing).
Skipped when Chromium, its driver or Selenium is not installed.
"""

from __future__ import annotations

import json
import re

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.browser_fixtures import chromium, missing_reason, set_viewport, wait_for
from tests.server_fixtures import live_server

pytestmark = [pytest.mark.browser, pytest.mark.skipif(missing_reason() is not None, reason=missing_reason() or "")]

CLASSES = ["background", "disc", "square", "triangle", "ring", "striped_blob"]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("console-browser")
    image = root / "scene.png"
    from seglock.models.data.synth import generate_scene

    Image.fromarray(generate_scene(11, 3, 128)[0]).resize((160, 120)).save(image)
    with live_server(root / "home") as server:
        tokens = json.loads((root / "home" / "initial-tokens.json").read_text())
        with chromium(1280, 800) as driver:
            yield {**server, "driver": driver, "tokens": tokens, "image": image, "made": []}


def by_id(driver, element_id):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def css_all(driver, selector):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def visible(driver, element_id) -> bool:
    return by_id(driver, element_id).is_displayed()


def fresh_page(site, page=""):
    driver = site["driver"]
    # forget the last test's token on another page of the origin, so that /ui loads afresh (from
    # /ui itself, /ui#page would be a same-page hash change racing the old page's sign-in)
    driver.get(site["base"] + "/ui/favicon.svg")
    driver.execute_script("sessionStorage.clear()")
    driver.get(site["base"] + "/ui" + (f"#{page}" if page else ""))
    wait_for(lambda: visible(driver, "page-signin"), 45, "the sign-in page")
    return driver


def sign_in(site, who="admin", page=""):
    """Sign in with the keyboard only: type the token and press Enter."""
    from selenium.webdriver.common.keys import Keys

    driver = fresh_page(site, page)
    field = by_id(driver, "token-input")
    field.click()
    field.send_keys(site["tokens"][who] + Keys.ENTER)
    wait_for(lambda: visible(driver, "signout"), 45, "signing in")
    return driver


def go(driver, page):
    """Follow the nav link with the keyboard (focus it, press Enter)."""
    from selenium.webdriver.common.keys import Keys

    link = css_all(driver, f'#nav a[data-page="{page}"]')[0]
    link.send_keys(Keys.ENTER)
    wait_for(lambda: visible(driver, f"page-{page}"), 45, f"the {page} page")


def choose(driver, select_id, value):
    from selenium.webdriver.support.ui import Select

    wait_for(lambda: value in [o.get_attribute("value") for o in Select(by_id(driver, select_id)).options],
             20, f"{value} in #{select_id}")
    Select(by_id(driver, select_id)).select_by_value(value)


def canvas_pixels(driver, canvas_id) -> np.ndarray:
    data = driver.execute_script(
        "const c = document.getElementById(arguments[0]);"
        "return [c.width, c.height, Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)];",
        canvas_id)
    width, height, flat = data
    return np.array(flat, dtype=np.uint8).reshape(height, width, 4)


def set_range(driver, element_id, value):
    driver.execute_script("const r = document.getElementById(arguments[0]); r.value = arguments[1];"
                          "r.dispatchEvent(new Event('input'));", element_id, str(value))


def admin_get(site, path):
    return httpx.get(site["base"] + path, headers={"Authorization": f"Bearer {site['tokens']['admin']}"}, timeout=30)


# -- the tests ----------------------------------------------------------------------------------

def test_sign_in_segment_an_image_and_see_the_overlay_and_legend(site):
    driver = sign_in(site)
    assert visible(driver, "page-try")
    assert by_id(driver, "who").text == "initial-admin · segment + admin"
    choose(driver, "try-model", "demo-cp")
    by_id(driver, "try-file").send_keys(str(site["image"]))
    wait_for(lambda: visible(driver, "try-result") and not visible(driver, "try-busy"), 60, "the mask")
    assert not visible(driver, "try-error")

    set_range(driver, "try-opacity", 0)
    bare = canvas_pixels(driver, "try-canvas")
    set_range(driver, "try-opacity", 100)
    masked = canvas_pixels(driver, "try-canvas")
    assert bare.shape == masked.shape == (120, 160, 4)
    assert (bare[..., 0] == bare[..., 1]).all() and (bare[..., 1] == bare[..., 2]).all()  # the image in grey
    coloured = (masked[..., :3] != bare[..., :3]).any(axis=2)
    assert 0.02 < coloured.mean() < 0.98  # the overlay is drawn where the mask is not background

    rows = css_all(driver, "#try-legend tbody tr")
    assert [row.get_attribute("data-class") for row in rows] == CLASSES
    shares = [float(row.find_elements("css selector", "td")[2].text.rstrip(" %")) for row in rows]
    assert abs(sum(shares) - 100.0) < 0.5
    facts = {dd.get_attribute("data-fact"): dd.text for dd in css_all(driver, "#try-facts dd")}
    served = {m["name"]: m for m in admin_get(site, "/admin/models").json()["models"]}["demo-cp"]
    assert facts["Model"] == "demo-cp" and facts["Protection"] == "cp"
    assert facts["Model version"] == str(served["model_version"])
    assert facts["Key version"] == str(served["key_version"])
    assert re.fullmatch(r"\d+ ms \(round trip, this browser\)", facts["Request time"])
    assert facts["Mask size"] == "160 × 120 px"


def test_block_and_per_image_models_say_the_server_encrypts_plain_uploads(site):
    driver = sign_in(site)
    for model, words in (("demo-shf", "the server encrypts it with the model's block key"),
                         ("demo-per-image", "the server encrypts it with a fresh random key")):
        choose(driver, "try-model", model)
        assert words in by_id(driver, "try-mode-note").text
        by_id(driver, "try-sample").click()
        wait_for(lambda model=model: not visible(driver, "try-busy") and
                 {dd.get_attribute("data-fact"): dd.text for dd in css_all(driver, "#try-facts dd")}.get("Model")
                 == model, 60, f"the {model} mask")
        assert not visible(driver, "try-error")


def test_thief_view_shows_two_different_pictures_for_demo_cp(site):
    driver = sign_in(site)
    go(driver, "thief")
    choose(driver, "thief-model", "demo-cp")
    by_id(driver, "thief-sample").click()
    wait_for(lambda: visible(driver, "thief-result") and not visible(driver, "thief-busy"), 60, "the thief view")
    set_range(driver, "thief-opacity", 100)  # every class colour fully drawn
    keyed, stolen = canvas_pixels(driver, "thief-keyed"), canvas_pixels(driver, "thief-stolen")
    assert keyed.shape == stolen.shape == (128, 128, 4)
    differing = (keyed[..., :3] != stolen[..., :3]).any(axis=2).mean()
    summary = by_id(driver, "thief-summary").text
    agreement = float(re.search(r"agree on ([\d.]+) %", summary).group(1)) / 100
    assert summary.startswith("demo-cp (cp): the two masks agree on")
    # the pictures differ exactly where the masks do, and that is a good part of the image
    assert abs(differing - (1 - agreement)) <= 0.0006 and differing > 0.1
    assert by_id(driver, "thief-advantage").text.startswith("No suite report for this model.")
    report = {"kind": "suite", "model": "demo-cp", "fraction": 0.1, "owner": {"mIoU": 71.2},
              "no_key": {"mIoU": 9.4}, "alternatives": {"scratch": {"mIoU": 40.3}, "public": None},
              "attacks": [{"name": "finetune", "mIoU": 40.8, "seconds": 95.0, "advantage": 0.5}], "advantage": 0.5}
    (site["home"] / "models" / "demo-cp" / "suite.json").write_text(json.dumps(report))
    by_id(driver, "thief-sample").click()
    wait_for(lambda: by_id(driver, "thief-advantage").text.startswith("Largest thief's advantage"), 60, "the report")
    assert by_id(driver, "thief-advantage").text.startswith(
        "Largest thief's advantage: 0.5 mIoU points over the best honest alternative, with 10 % of the training data.")
    rows = [[td.text for td in row.find_elements("css selector", "td")]
            for row in css_all(driver, "#advantage-table tbody tr")]
    assert rows == [["owner, with the key", "71.2", "—", "—"], ["thief, stolen file, no key", "9.4", "—", "—"],
                    ["honest alternative: scratch", "40.3", "—", "—"], ["attack: finetune", "40.8", "0.5", "95"]]
    assert [row.get_attribute("data-class") for row in css_all(driver, "#thief-legend tbody tr")] == CLASSES
    models = [o.get_attribute("value") for o in css_all(driver, "#thief-model option")]
    assert models == ["demo-cp", "demo-per-image", "demo-shf"]  # unprotected models have nothing to steal


def test_create_a_token_see_its_secret_once_and_revoke_it(site):
    driver = sign_in(site)
    go(driver, "tokens")
    by_id(driver, "new-token-name").send_keys("browser-made")
    wait_for(lambda: css_all(driver, '.model-choice[value="demo-plain"]'), 45, "the model choices")
    css_all(driver, '.model-choice[value="demo-plain"]')[0].click()
    css_all(driver, "#token-form button[type=submit]")[0].click()
    wait_for(lambda: visible(driver, "secret-dialog"), 45, "the new token's dialog")
    secret = by_id(driver, "secret-value").text
    assert re.fullmatch(r"slk_[0-9a-f]{12}_[0-9a-f]{64}", secret)
    site["made"].append(secret)
    me = httpx.get(site["base"] + "/v1/whoami", headers={"Authorization": f"Bearer {secret}"}, timeout=30).json()
    assert (me["name"], me["scopes"], me["models"]) == ("browser-made", ["segment"], ["demo-plain"])
    by_id(driver, "secret-copy").click()
    wait_for(lambda: by_id(driver, "secret-copied").text, 30, "the copy confirmation")
    by_id(driver, "secret-done").click()
    wait_for(lambda: not visible(driver, "secret-dialog"), 30, "the dialog to close")
    assert by_id(driver, "secret-value").get_attribute("textContent") == ""  # shown once, then gone
    assert secret not in driver.page_source

    row = wait_for(lambda: css_all(driver, f'#tokens-table tr[data-token="{me["id"]}"]'), 45, "the new row")[0]
    row.find_element("css selector", "button.revoke").click()
    wait_for(lambda: visible(driver, "confirm-dialog"), 30, "the confirmation")
    assert by_id(driver, "confirm-title").text == "Revoke token browser-made?"
    by_id(driver, "confirm-ok").click()
    wait_for(lambda: css_all(driver, f'#tokens-table tr[data-token="{me["id"]}"] td.status')[0].text == "revoked",
             20, "the revoked status")
    refused = httpx.get(site["base"] + "/v1/whoami", headers={"Authorization": f"Bearer {secret}"}, timeout=30)
    assert refused.status_code == 401 and refused.json()["error"]["message"] == "the API token was revoked"


def test_api_errors_are_shown_with_the_apis_message(site):
    driver = sign_in(site)
    go(driver, "tokens")
    css_all(driver, "#token-form button[type=submit]")[0].click()  # no name
    wait_for(lambda: visible(driver, "token-form-error"), 45, "the error")
    assert by_id(driver, "token-form-error").text == "name: String should have at least 1 character"
    by_id(driver, "new-token-name").send_keys("no models")
    css_all(driver, "#token-form button[type=submit]")[0].click()
    wait_for(lambda: "at least 1 item" in by_id(driver, "token-form-error").text, 45, "the models error")
    assert by_id(driver, "token-form-error").text == "models: List should have at least 1 item after validation, not 0"

    from selenium.webdriver.common.keys import Keys

    driver = fresh_page(site)
    by_id(driver, "token-input").send_keys("slk_000000000000_" + "0" * 64 + Keys.ENTER)
    wait_for(lambda: visible(driver, "signin-error"), 45, "the sign-in error")
    assert by_id(driver, "signin-error").text == "the API token is not valid"
    assert driver.execute_script("return sessionStorage.getItem('seglock.token')") is None


def test_rotate_demo_cp_after_confirming_and_see_the_key_version_change(site):
    driver = sign_in(site)
    go(driver, "models")

    def row():
        return css_all(driver, '#models-table tr[data-model="demo-cp"]')[0]

    before = wait_for(lambda: row().find_element("css selector", "td.key-version").text, 45, "the models table")
    version = int(before.lstrip("v"))
    row().find_element("css selector", "button.rotate").click()
    wait_for(lambda: visible(driver, "confirm-dialog"), 30, "the confirmation")
    by_id(driver, "confirm-cancel").click()  # cancelled: nothing changes
    wait_for(lambda: not visible(driver, "confirm-dialog"), 30, "the dialog to close")
    assert {m["name"]: m for m in admin_get(site, "/admin/models").json()["models"]}["demo-cp"]["key_version"] \
        == version

    row().find_element("css selector", "button.rotate").click()
    wait_for(lambda: visible(driver, "confirm-dialog"), 30, "the confirmation")
    assert by_id(driver, "confirm-title").text == "Rotate the key of demo-cp?"
    by_id(driver, "confirm-ok").click()
    wait_for(lambda: row().find_element("css selector", "td.key-version").text == f"v{version + 1}", 60,
             "the new key version")
    status = by_id(driver, "models-status").text
    assert re.fullmatch(rf"demo-cp: key version {version} → {version + 1} in [\d.]+ s\.", status)
    served = {m["name"]: m for m in admin_get(site, "/admin/models").json()["models"]}["demo-cp"]
    assert served["key_version"] == version + 1
    assert [(k["version"], k["state"]) for k in served["key_versions"]][-2:] == [(version, "destroyed"),
                                                                                 (version + 1, "active")]


def test_audit_page_is_filtered_and_paged(site):
    driver = sign_in(site)
    go(driver, "audit")
    wait_for(lambda: css_all(driver, "#audit-table tbody tr"), 45, "audit rows")
    by_id(driver, "audit-action").send_keys("token.create")
    css_all(driver, "#audit-form button")[0].click()
    expected = admin_get(site, "/admin/audit?action=token.create&limit=500").json()["total"]
    wait_for(lambda: by_id(driver, "audit-range").text == f"1–{expected} of {expected}", 45, "the filtered page")
    actions = {row.find_elements("css selector", "td")[2].text for row in css_all(driver, "#audit-table tbody tr")}
    assert actions == {"token.create"}
    by_id(driver, "audit-action").clear()
    from selenium.webdriver.support.ui import Select

    Select(by_id(driver, "audit-limit")).select_by_visible_text("10")
    css_all(driver, "#audit-form button")[0].click()
    total = admin_get(site, "/admin/audit?limit=1").json()["total"]
    assert total > 10
    wait_for(lambda: by_id(driver, "audit-range").text.startswith("1–10 of "), 45, "the first page")
    assert len(css_all(driver, "#audit-table tbody tr")) == 10
    by_id(driver, "audit-next").click()
    wait_for(lambda: by_id(driver, "audit-range").text.startswith("11–"), 45, "the second page")
    by_id(driver, "audit-prev").click()
    wait_for(lambda: by_id(driver, "audit-range").text.startswith("1–10 of "), 45, "the first page again")


def test_metrics_page_shows_requests_latency_batches_and_queue_depth(site):
    driver = sign_in(site)
    go(driver, "metrics")
    wait_for(lambda: css_all(driver, '#metrics-models tr[data-model="demo-cp"]'), 45, "the models table")
    cells = css_all(driver, '#metrics-models tr[data-model="demo-cp"] td')
    assert int(cells[1].text) >= 1 and int(cells[2].text) >= 1  # batches, images
    assert cells[5].text == "0"
    routes = {row.get_attribute("data-route") for row in css_all(driver, "#metrics-routes tbody tr")}
    assert "POST /v1/models/{name}/segment" in routes and "GET /v1/whoami" in routes


def test_a_segment_token_sees_no_admin_page_and_the_api_refuses_it(site):
    driver = sign_in(site, who="client", page="tokens")
    assert visible(driver, "page-try") and not visible(driver, "page-tokens")  # #tokens is not for it
    shown = [a.get_attribute("data-page") for a in css_all(driver, "#nav a") if a.is_displayed()]
    assert shown == ["try", "metrics"]
    for page in ("thief", "models", "tokens", "audit"):
        driver.execute_script("location.hash = arguments[0]", page)
        wait_for(lambda: visible(driver, "page-try"), 30, "the try page")
        assert not visible(driver, f"page-{page}")
    answer = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch('/admin/tokens', {headers: {Authorization: 'Bearer ' + sessionStorage.getItem('seglock.token')}})"
        ".then(r => r.json().then(b => done([r.status, b.error.message])));")
    assert answer == [403, "this token lacks the 'admin' scope"]


def test_sign_out_forgets_the_token(site):
    driver = sign_in(site)
    assert driver.execute_script("return sessionStorage.getItem('seglock.token')") == site["tokens"]["admin"]
    by_id(driver, "signout").click()
    wait_for(lambda: visible(driver, "page-signin"), 30, "the sign-in page")
    assert driver.execute_script("return sessionStorage.length") == 0
    assert not visible(driver, "nav") and driver.current_url == site["base"] + "/ui"
    driver.get(site["base"] + "/ui#tokens")
    wait_for(lambda: visible(driver, "page-signin"), 30, "the sign-in page")
    assert not visible(driver, "page-tokens")


def test_phone_width_has_no_sideways_scrolling(site):
    driver = site["driver"]
    try:
        set_viewport(driver, 390, 844)
        sign_in(site)
        by_id(driver, "try-sample").click()
        wait_for(lambda: visible(driver, "try-result") and not visible(driver, "try-busy"), 60, "the mask")
        for page in ("try", "tokens", "models"):
            go(driver, page)
            assert driver.execute_script("return document.documentElement.scrollWidth") <= 390, page
    finally:
        set_viewport(driver, 1280, 800)


def test_no_token_in_any_url_page_source_or_server_log(site):
    driver = sign_in(site)
    go(driver, "audit")
    urls = [json.loads(entry["message"])["message"].get("params", {}).get("request", {}).get("url", "")
            for entry in driver.get_log("performance")]
    urls += [json.loads(entry["message"])["message"].get("params", {}).get("documentURL", "")
             for entry in driver.get_log("performance")]
    assert any(url.startswith(site["base"] + "/v1/whoami") for url in urls)
    secrets = [token.rsplit("_", 1)[1] for token in [*site["tokens"].values(), *site["made"]]]
    assert site["made"], "the token test made a token first"
    for secret in secrets:
        assert all(secret not in url for url in urls)
        assert secret not in driver.page_source
        assert secret not in driver.current_url
    log = site["log"].read_text()
    assert " GET /v1/whoami 200 " in log and " POST /admin/models/{name}/thief-view" not in log
    assert re.search(r" POST /admin/models/demo-cp/thief-view 200 ", log)
    for secret in secrets:
        assert secret not in log


def test_no_script_error_or_content_security_policy_violation_in_any_test(site):
    # runs last: the browser's console log holds every message since the module's first test
    entries = site["driver"].get_log("browser")
    problems = [e["message"] for e in entries
                if "Content Security Policy" in e["message"] or "Uncaught" in e["message"]]
    assert problems == []
    assert entries, "the console log was read"
