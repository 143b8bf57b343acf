"""The web console in headless Chromium (WebDriver through selenium) against a running
`moonshard serve`: the API key prompt, a streamed chat answer, Stop freeing the request on the
server (its /metrics), a 20-item arc_easy eval and its table, telemetry charts gaining points,
and the banner once the server is gone; with --ranks-url, a server of two tensor-parallel ranks
(`moonshard launch -n 2 serve --tp 2`, no key) whose collectives chart draws both ranks' all-reduce
time while completions run. Screenshots go to OUTDIR.

    python3 tests/web/console_browser.py URL OUTDIR --api-key KEY --pid SERVER_PID [--ranks-url URL2]

Prints one JSON line of what it saw; exits non-zero (with the reason) on a failed check.
"""
import argparse
import json
import os
import signal
import sys
import threading
import time
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


def fail(msg):
    raise AssertionError(msg)


def metrics(url, key):
    req = urllib.request.Request(url + "/metrics", headers={"Authorization": "Bearer " + key})
    text = urllib.request.urlopen(req, timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, value = line.rsplit(" ", 1)
        out[name] = float(value)
    return out


def api_json(url, path, key):
    req = urllib.request.Request(url + path, headers={"Authorization": "Bearer " + key})
    return json.loads(urllib.request.urlopen(req, timeout=5).read().decode())


def background_completion(url, key):
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 300, "ignore_eos": True}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body, headers={
        "Authorization": "Bearer " + key, "Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=60).read()


def load_until(url, stop, key=None):
    """completions one after another until stop is set"""
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 48, "ignore_eos": True}).encode()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = "Bearer " + key
    while not stop.is_set():
        urllib.request.urlopen(urllib.request.Request(url + "/v1/completions", data=body, headers=headers),
                               timeout=30).read()


def cancelled_total(m):
    return sum(v for k, v in m.items() if k.startswith("moonshard_requests_cancelled_total"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("outdir")
    ap.add_argument("--api-key", required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    ap.add_argument("--ranks-url")
    a = ap.parse_args()
    os.makedirs(a.outdir, exist_ok=True)
    seen = {}

    opts = Options()
    opts.binary_location = a.chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1360,1060", "--no-first-run", "--disable-extensions"):
        opts.add_argument(flag)
    drv = webdriver.Chrome(service=Service(a.chromedriver), options=opts)
    drv.set_script_timeout(30)
    wait = WebDriverWait(drv, 20, poll_frequency=0.05)
    try:
        # -- the page asks for the key once and keeps it for the session
        drv.get(a.url + "/")
        wait.until(lambda d: d.find_element(By.ID, "key-form").is_displayed())
        drv.find_element(By.ID, "key-input").send_keys(a.api_key)
        drv.find_element(By.ID, "key-form").submit()
        wait.until(lambda d: d.find_element(By.ID, "model-line").get_attribute("data-model") == "stories260K")
        if drv.find_element(By.ID, "key-form").is_displayed():
            fail("the key form is still shown after a good key")
        if drv.execute_script("return sessionStorage.getItem('moonshard.apiKey')") != a.api_key:
            fail("the key is not kept in sessionStorage")
        seen["model_line"] = drv.find_element(By.ID, "model-line").text
        if "cpu" not in seen["model_line"] or "tp 1" not in seen["model_line"]:
            fail("the placement is not shown: " + seen["model_line"])

        # -- a chat message: the answer streams in (its text grows while the request runs)
        drv.execute_script("""
          window.__grow = [];
          new MutationObserver(() => {
            const m = document.querySelectorAll('.msg.assistant');
            const b = m[m.length - 1];
            if (b && b.dataset.state === 'streaming') window.__grow.push(b.querySelector('.text').textContent.length);
          }).observe(document.getElementById('messages'), { subtree: true, childList: true, characterData: true,
            attributes: true });""")
        drv.find_element(By.CSS_SELECTOR, "#settings summary").click()
        drv.find_element(By.ID, "max_tokens").clear()
        drv.find_element(By.ID, "max_tokens").send_keys("128")  # long enough to be seen growing on a busy machine
        drv.find_element(By.ID, "chat-input").send_keys("Tell me a story about a cat.")
        drv.find_element(By.ID, "send").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-state=done]"))
        answer = drv.find_element(By.CSS_SELECTOR, ".msg.assistant .text").text
        grow = drv.execute_script("return window.__grow")
        distinct = sorted(set(n for n in grow if n > 0))
        seen["chat"] = {"text": answer[:80], "lengths_while_streaming": len(distinct),
                        "chunks": int(drv.find_element(By.CSS_SELECTOR, ".msg.assistant").get_attribute("data-chunks"))}
        if not answer.strip():
            fail("no answer text")
        if len(distinct) < 2:
            fail("the answer did not appear piece by piece while streaming: %r" % grow[:20])
        drv.save_screenshot(os.path.join(a.outdir, "console-chat.png"))

        # -- Stop mid-answer: the connection closes, the server cancels the request, frees its blocks
        drv.find_element(By.ID, "clear").click()
        before = metrics(a.url, a.api_key)
        drv.find_element(By.ID, "max_tokens").clear()
        drv.find_element(By.ID, "max_tokens").send_keys("400")
        drv.find_element(By.ID, "ignore_eos").click()
        drv.execute_script("""
          new MutationObserver((_, obs) => {
            const m = document.querySelectorAll('.msg.assistant');
            const b = m[m.length - 1];
            if (b && b.dataset.state === 'streaming' && Number(b.dataset.chunks) >= 1) {
              obs.disconnect();
              window.__stopAt = Number(b.dataset.chunks);
              document.getElementById('stop').click();
            }
          }).observe(document.getElementById('messages'), { subtree: true, attributes: true });""")
        # other clients' long answers beside it: the page's answer takes long enough to be stopped
        load = [threading.Thread(target=background_completion, args=(a.url, a.api_key)) for _ in range(6)]
        for t in load:
            t.start()
        drv.find_element(By.ID, "chat-input").send_keys("And another one, please.")
        drv.find_element(By.ID, "send").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-state=stopped]")) == 1)
        for t in load:
            t.join()
        deadline, after = time.time() + 10, None
        while time.time() < deadline:
            after = metrics(a.url, a.api_key)
            if (cancelled_total(after) > cancelled_total(before) and after["moonshard_running_sequences"] == 0
                    and after["moonshard_kv_blocks_used"] == 0):
                break
            time.sleep(0.05)
        seen["stop"] = {"stop_at_chunk": drv.execute_script("return window.__stopAt"),
                        "cancelled": cancelled_total(after) - cancelled_total(before),
                        "running": after["moonshard_running_sequences"], "kv_used": after["moonshard_kv_blocks_used"]}
        # the counter counts a client gone before its answer ended: the server cut the request short
        if cancelled_total(after) != cancelled_total(before) + 1:
            fail("the server did not cancel the stopped request: %r" % seen["stop"])
        if after["moonshard_running_sequences"] != 0 or after["moonshard_kv_blocks_used"] != 0:
            fail("the stopped request still holds a slot or KV blocks: %r" % seen["stop"])

        # -- telemetry: the charts gain a point a second; series without a source say n/a
        p0 = int(drv.find_element(By.ID, "chart-tokens").get_attribute("data-points"))
        time.sleep(2.2)
        p1 = int(drv.find_element(By.ID, "chart-tokens").get_attribute("data-points"))
        seen["chart_points"] = [p0, p1]
        if p1 < p0 + 1:
            fail("the tokens chart gained no points: %d -> %d" % (p0, p1))
        na = drv.find_element(By.CSS_SELECTOR, "#chart-collectives .now").text
        if na != "n/a":
            fail("the collectives chart shows %r on a one-rank CPU run, not n/a" % na)

        # -- a 20-item arc_easy eval: progress, then its table; the run joins the past runs
        for cb in drv.find_elements(By.CSS_SELECTOR, "#eval-tasks input"):
            if cb.is_selected() != (cb.get_attribute("value") == "arc_easy"):
                cb.click()
        lim = drv.find_element(By.ID, "eval-limit")
        lim.clear()
        lim.send_keys("20")
        drv.find_element(By.ID, "eval-start").click()
        wait.until(lambda d: d.find_element(By.ID, "eval-panel").get_attribute("data-job"))
        job_id = drv.find_element(By.ID, "eval-panel").get_attribute("data-job")
        WebDriverWait(drv, 40, poll_frequency=0.1).until(
            lambda d: d.find_element(By.ID, "eval-results").is_displayed())
        rows = drv.find_elements(By.CSS_SELECTOR, "#eval-results tbody tr")
        table = {r.get_attribute("data-metric"): float(r.find_elements(By.TAG_NAME, "td")[2].text) for r in rows}
        job = api_json(a.url, "/v1/console/evals/" + job_id, a.api_key)
        seen["eval"] = {"id": job_id, "table": table, "state": job["state"]}
        if job["state"] != "done" or job["total"] != 80 or job["done"] != 80:
            fail("the eval job did not score its 80 requests: %r" % {k: job[k] for k in ("state", "done", "total")})
        want = job["results"]["results"]["arc_easy"]
        if set(table) != {"acc", "acc_norm"} or abs(table["acc"] - want["acc,none"]) > 5e-5 \
                or abs(table["acc_norm"] - want["acc_norm,none"]) > 5e-5:
            fail("the results table %r is not the job's %r" % (table, want))
        bar = drv.find_element(By.ID, "eval-progress")
        if float(bar.get_attribute("value")) != float(bar.get_attribute("max")):
            fail("the progress bar is not full at the end")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#eval-runs tr[data-run='%s']" % job_id))
        run_text = drv.find_element(By.CSS_SELECTOR, "#eval-runs tr[data-run='%s']" % job_id).text
        if "arc_easy acc" not in run_text:
            fail("the past run shows no score: " + run_text)
        drv.execute_script("window.scrollTo(0, 0)")
        time.sleep(1.2)  # one more telemetry point in the picture
        drv.save_screenshot(os.path.join(a.outdir, "console.png"))

        # -- the server goes away: a banner says so
        os.kill(a.pid, signal.SIGTERM)
        WebDriverWait(drv, 10, poll_frequency=0.1).until(lambda d: d.find_element(By.ID, "banner").is_displayed())
        seen["banner"] = drv.find_element(By.ID, "banner").text
        if "not answering" not in seen["banner"]:
            fail("the banner does not say the server is gone: " + seen["banner"])
        drv.save_screenshot(os.path.join(a.outdir, "console-gone.png"))
        # script errors only (refused requests and the server going away are network entries)
        logs = [e for e in drv.get_log("browser") if e.get("level") == "SEVERE"
                and "Failed to load resource" not in e.get("message", "")]
        seen["console_errors"] = [e["message"] for e in logs]
        if logs:
            fail("the page logged errors: %r" % seen["console_errors"])

        # -- two tensor-parallel ranks: the collectives chart draws each rank's all-reduce time
        if a.ranks_url:
            drv.get(a.ranks_url + "/")
            wait.until(lambda d: "tp 2" in d.find_element(By.ID, "model-line").text)
            stop = threading.Event()
            loader = threading.Thread(target=load_until, args=(a.ranks_url, stop))
            loader.start()

            def both_ranks(d):
                text = d.find_element(By.CSS_SELECTOR, "#chart-collectives .now").text
                vals = {}
                for part in text.replace(" ms/s", "").split(" · "):
                    bits = part.split(" ")
                    if len(bits) == 3:
                        try:
                            vals[bits[0] + " " + bits[1]] = float(bits[2])
                        except ValueError:
                            pass
                ok = vals.get("r0 all_reduce", 0) > 0 and vals.get("r1 all_reduce", 0) > 0
                return (text, vals) if ok else False
            try:
                text, vals = WebDriverWait(drv, 12, poll_frequency=0.1).until(both_ranks)
            finally:
                stop.set()
                loader.join()
            chart = drv.find_element(By.ID, "chart-collectives")
            seen["ranks"] = {"collectives": text, "values": int(chart.get_attribute("data-values")),
                             "series": chart.get_attribute("data-series").split(",")}
            if "na" in chart.get_attribute("class").split():
                fail("the collectives chart says n/a on two ranks")
            drv.save_screenshot(os.path.join(a.outdir, "console-ranks.png"))
    except Exception:
        try:
            drv.save_screenshot(os.path.join(a.outdir, "console-failure.png"))
        except Exception:
            pass
        print(json.dumps(seen))
        raise
    finally:
        drv.quit()
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
