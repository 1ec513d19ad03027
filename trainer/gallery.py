"""What a grid leaves for people to look at: index.json, contact sheets and a static gallery page.

Written into ``<run root>/images/`` beside the PNGs, all with relative links, so the folder (or
the bucket prefix) opens straight in a browser -- no server, no JavaScript needed to see images:

``index.json``
    ``{"format": "tinv.grid-index/v1", "grid": {name, namespace, uid}, "model", "embeddings",
    "axes", "images_total", "images_present", "complete", "contact_sheets": [{prompt_index,
    prompt, file}], "images": [{file, index, prompt_index, prompt, negative_prompt, guidance_scale,
    steps, scheduler, width, height, seed, seed_base, image_in_cell, present}], "updated_at"}``
``sheets/p<NNN>.png``
    one contact sheet per prompt: guidance scales across, seeds (and any other axis: size,
    scheduler, steps, image in cell) down, every row and column labelled.
``index.html``
    the gallery: per prompt its contact sheet and every image with its parameters; a filter box
    (progressive enhancement: without JavaScript everything is simply listed).

Every shard calls :func:`build` when it finishes; each call lists what exists, so the last shard
to finish writes the complete gallery (it re-checks once more after writing, so two shards
finishing together still leave a complete one).
"""

from __future__ import annotations

import concurrent.futures as cf
import html
import io
import json
import logging
import textwrap
import urllib.parse
from dataclasses import dataclass
from typing import Sequence

from tinv.api import storage as api_storage

from .grid import axis_values
from .runtime import now

log = logging.getLogger("tinv.trainer")

INDEX_FORMAT = "tinv.grid-index/v1"
SHEETS_DIR = "sheets"


@dataclass
class Built:
    gallery_uri: str
    index_uri: str
    complete: bool
    present: int
    sheets: list[str]


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except Exception:  # noqa: BLE001 - Pillow without FreeType
        return ImageFont.load_default()


def _thumb_box(images) -> int:
    side = max(max(i.width, i.height) for i in images)
    return max(128, min(256, side))


def contact_sheet(prompt: str, cells: dict, columns: list[float], rows: list[tuple], row_labels: dict, box: int = 192):
    """A labelled sheet: `cells[(row, guidance)]` -> PIL image or None (drawn as 'missing')."""
    from PIL import Image, ImageDraw

    pad, label_w, head_h = 8, 190, 28
    title_font, font, small = _font(16), _font(13), _font(12)
    title_lines = textwrap.wrap(prompt, width=max(30, (label_w + len(columns) * (box + pad)) // 8)) or [""]
    title_h = 10 + 20 * len(title_lines)
    W = label_w + len(columns) * (box + pad) + pad
    H = title_h + head_h + len(rows) * (box + pad) + pad
    sheet = Image.new("RGB", (W, H), (250, 250, 250))
    d = ImageDraw.Draw(sheet)
    for li, line in enumerate(title_lines):
        d.text((pad, 6 + 20 * li), line, fill=(20, 20, 20), font=title_font)
    y0 = title_h
    for ci, g in enumerate(columns):
        x = label_w + ci * (box + pad)
        d.text((x + box // 2, y0 + head_h // 2), f"guidance {g:g}", fill=(40, 40, 40), font=font, anchor="mm")
    for ri, row in enumerate(rows):
        y = y0 + head_h + ri * (box + pad)
        for li, line in enumerate(row_labels[row]):
            d.text((pad, y + box // 2 - 9 * len(row_labels[row]) + 18 * li), line, fill=(40, 40, 40), font=small)
        for ci, g in enumerate(columns):
            x = label_w + ci * (box + pad)
            im = cells.get((row, g))
            if im is None:
                d.rectangle([x, y, x + box - 1, y + box - 1], fill=(225, 225, 225), outline=(200, 200, 200))
                d.text((x + box // 2, y + box // 2), "not rendered", fill=(120, 120, 120), font=small, anchor="mm")
                continue
            w, h = im.size
            s = box / max(w, h)
            tw, th = max(1, round(w * s)), max(1, round(h * s))
            resample = Image.NEAREST if s > 1 else Image.LANCZOS
            t = im.resize((tw, th), resample)
            sheet.paste(t, (x + (box - tw) // 2, y + (box - th) // 2))
    return sheet


def _row_key(img) -> tuple:
    return (img.width, img.height, img.scheduler, img.steps, img.seed_base, img.k)


def _row_label(img, multi: dict) -> list[str]:
    first = f"seed {img.seed}" + (f"  (cell seed {img.seed_base}, #{img.k})" if img.k else "")
    second = f"{img.scheduler}, {img.steps} steps"
    lines = [first, second]
    if multi["sizes"]:
        lines.append(f"{img.width}x{img.height}")
    return lines


def _read_images(store, images_uri: str, names: list[str], workers: int = 8, box: int = 256) -> dict:
    """name -> (thumbnail at most box px, tinv metadata) for the PNGs that can be read."""
    from PIL import Image

    def load(name):
        try:
            data = store.read_bytes(api_storage.join(images_uri, name))
            im = Image.open(io.BytesIO(data))
            meta = json.loads(getattr(im, "text", {}).get("tinv", "null") or "null")
            im = im.convert("RGB")
            im.thumbnail((box, box), Image.LANCZOS)  # only thumbnails stay in memory
            return name, im, meta
        except Exception as e:  # noqa: BLE001 - shown as missing
            log.warning("gallery: cannot read %s: %s", name, e)
            return name, None, None

    out = {}
    with cf.ThreadPoolExecutor(max_workers=workers) as ex:
        for name, im, meta in ex.map(load, names):
            if im is not None:
                out[name] = (im, meta)
    return out


def build(store, grid, images: Sequence, images_uri: str, *, retries: int = 2) -> Built:
    """Write index.json, the contact sheets and index.html for the images present now."""
    built = None
    seen = -1
    for _ in range(retries + 1):
        present = {u.rsplit("/", 1)[-1] for u in store.list(images_uri) if u.endswith(".png")}
        ours = {img.filename for img in images} & present
        if len(ours) == seen:
            break
        seen = len(ours)
        built = _build_once(store, grid, images, images_uri, ours)
        if built.complete:
            break
    return built  # type: ignore[return-value]


def _build_once(store, grid, images: Sequence, images_uri: str, present: set[str]) -> Built:

    loaded = _read_images(store, images_uri, sorted(present))
    spec = grid.spec
    first_meta = next((m for _, m in loaded.values() if m), None) or {}
    multi = {"sizes": len(spec.grid.sizes) > 1}
    sheets = []
    for pi, prompt in enumerate(spec.prompts):
        mine = [img for img in images if img.prompt_index == pi]
        if not mine:
            continue
        columns = list(dict.fromkeys(img.guidance_scale for img in mine))
        rows = list(dict.fromkeys(_row_key(img) for img in mine))
        labels, cells = {}, {}
        for img in mine:
            labels.setdefault(_row_key(img), _row_label(img, multi))
            entry = loaded.get(img.filename)
            cells[(_row_key(img), img.guidance_scale)] = entry[0] if entry else None
        sheet = contact_sheet(prompt, cells, columns, rows, labels, box=_thumb_box(mine))
        buf = io.BytesIO()
        sheet.save(buf, format="PNG", compress_level=6)
        name = f"{SHEETS_DIR}/p{pi:03d}.png"
        store.write_bytes(api_storage.join(images_uri, name), buf.getvalue(), content_type="image/png")
        sheets.append({"prompt_index": pi, "prompt": prompt, "file": name})
    md = grid.metadata
    rows = []
    for img in images:
        rows.append({
            "file": img.filename, "index": img.index, "prompt_index": img.prompt_index, "prompt": img.prompt,
            "negative_prompt": img.negative_prompt, "guidance_scale": img.guidance_scale, "steps": img.steps,
            "scheduler": img.scheduler, "width": img.width, "height": img.height, "seed": img.seed,
            "seed_base": img.seed_base, "image_in_cell": img.k, "present": img.filename in present,
        })

    axes = axis_values(spec)
    axes["sizes"] = [f"{w}x{h}" for w, h in axes["sizes"]]
    index = {
        "format": INDEX_FORMAT,
        "grid": {"name": md.name, "namespace": md.namespace or "default", "uid": md.uid},
        "model": first_meta.get("model") or {"source": spec.model.source},
        "embeddings": first_meta.get("embeddings", []),
        "precision": first_meta.get("precision"),
        "device": first_meta.get("device"),
        "axes": {**axes, "images_per_cell": spec.images_per_cell, "negative_prompt": spec.negative_prompt},
        "images_total": len(images),
        "images_present": len(present),
        "complete": len(present) == len(images),
        "contact_sheets": sheets,
        "images": rows,
        "updated_at": now(),
    }
    index_uri = api_storage.join(images_uri, api_storage.INDEX_FILE)
    gallery_uri = api_storage.join(images_uri, api_storage.GALLERY_FILE)
    store.write_bytes(index_uri, json.dumps(index, indent=2).encode(), content_type="application/json")
    store.write_bytes(gallery_uri, render_html(index).encode(), content_type="text/html; charset=utf-8")
    log.info("gallery: %d of %d images -> %s", len(present), len(images), gallery_uri)
    return Built(gallery_uri, index_uri, index["complete"], len(present), [s["file"] for s in sheets])


_CSS = """
:root { color-scheme: light dark; --fg: #1b1b1f; --bg: #fafafa; --muted: #666; --card: #fff; --line: #ddd; }
@media (prefers-color-scheme: dark) { :root { --fg: #e8e8ea; --bg: #16161a; --muted: #9a9aa2; --card: #202026; --line: #333; } }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg); background: var(--bg); }
header { padding: 16px 24px; border-bottom: 1px solid var(--line); position: sticky; top: 0; background: var(--bg); z-index: 2; }
h1 { margin: 0 0 4px; font-size: 20px; }
.meta { color: var(--muted); margin: 0 0 8px; }
input[type=search] { width: min(480px, 100%); padding: 6px 10px; font: inherit; border: 1px solid var(--line); border-radius: 6px; background: var(--card); color: var(--fg); }
#status { color: var(--muted); margin-left: 12px; }
nav { padding: 8px 24px; display: flex; flex-wrap: wrap; gap: 6px 14px; }
nav a { color: inherit; }
section { padding: 8px 24px 24px; border-bottom: 1px solid var(--line); }
h2 { font-size: 16px; margin: 12px 0 4px; }
.neg { color: var(--muted); margin: 0 0 8px; }
.sheet { max-width: 100%; height: auto; border: 1px solid var(--line); image-rendering: auto; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(200px, 1fr)); gap: 12px; margin-top: 12px; }
figure { margin: 0; background: var(--card); border: 1px solid var(--line); border-radius: 6px; padding: 6px; }
figure img { display: block; width: 100%; height: auto; image-rendering: pixelated; background: #8884; }
figure.missing .ph { aspect-ratio: 1; display: grid; place-items: center; color: var(--muted); background: #8882; }
figcaption { font-size: 12px; color: var(--muted); margin-top: 4px; word-break: break-all; }
figcaption b { color: var(--fg); font-weight: 600; }
[hidden] { display: none !important; }
"""

_JS = """
(function () {
  var figs = Array.prototype.slice.call(document.querySelectorAll('figure[data-search]'));
  var status = document.getElementById('status');
  function count() {
    var imgs = document.querySelectorAll('figure img');
    var loaded = 0;
    for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) loaded++; }
    var shown = figs.filter(function (f) { return !f.hidden; }).length;
    status.textContent = shown + ' of ' + figs.length + ' images shown, ' + loaded + ' loaded';
    document.body.setAttribute('data-images-listed', String(imgs.length));
    document.body.setAttribute('data-images-loaded', String(loaded));
  }
  var box = document.getElementById('filter');
  box.addEventListener('input', function () {
    var words = box.value.toLowerCase().split(/\\s+/).filter(Boolean);
    figs.forEach(function (f) {
      var s = f.getAttribute('data-search');
      f.hidden = !words.every(function (w) { return s.indexOf(w) >= 0; });
    });
    count();
  });
  window.addEventListener('load', count);
  count();
})();
"""


def _q(name: str) -> str:
    return urllib.parse.quote(name)


def render_html(index: dict) -> str:
    """The gallery page for an index.json document (self-contained; relative image links)."""
    e = html.escape
    g = index["grid"]
    concepts = ", ".join(f"{c['token']}" + (f" ({c['checkpoint'][:8]})" if c.get("checkpoint") else "") for c in index.get("embeddings", []))
    model = (index.get("model") or {}).get("source", "?")
    head = (
        f"{index['images_present']} of {index['images_total']} images"
        + (" (complete)" if index["complete"] else " (still rendering, or some shards have not run)")
        + f" · model {e(model)}"
        + (f" · concepts {e(concepts)}" if concepts else "")
        + (f" · {e(index['precision'])} on {e(index['device'])}" if index.get("precision") else "")
        + f" · updated {e(index['updated_at'][:19].replace('T', ' '))} UTC"
    )
    out = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(g['name'] or 'grid')} · tinv gallery</title>",
        f"<style>{_CSS}</style></head><body>",
        "<header>",
        f"<h1>{e(g['name'] or 'grid')} <small class=\"meta\">{e(g.get('namespace') or '')}</small></h1>",
        f'<p class="meta">{head}</p>',
        '<input id="filter" type="search" placeholder="filter: words of the prompt, g7.5, seed 3, ddim, 512x512" aria-label="filter images">',
        '<span id="status"></span>',
        "</header>",
        "<nav>",
    ]
    by_prompt: dict[int, list] = {}
    for row in index["images"]:
        by_prompt.setdefault(row["prompt_index"], []).append(row)
    sheets = {s["prompt_index"]: s for s in index.get("contact_sheets", [])}
    for pi, rows in by_prompt.items():
        out.append(f'<a href="#p{pi:03d}">{pi}: {e(rows[0]["prompt"][:60])}</a>')
    out.append("</nav>")
    eager = 48
    n = 0
    for pi, rows in by_prompt.items():
        out.append(f'<section id="p{pi:03d}">')
        out.append(f"<h2>{e(rows[0]['prompt'])}</h2>")
        if rows[0].get("negative_prompt"):
            out.append(f'<p class="neg">negative prompt: {e(rows[0]["negative_prompt"])}</p>')
        if pi in sheets:
            f = sheets[pi]["file"]
            out.append(f'<a href="{_q(f)}"><img class="sheet" src="{_q(f)}" alt="contact sheet of prompt {pi}: guidance across, seeds down" loading="lazy"></a>')
        out.append('<div class="grid">')
        for r in rows:
            caption = (
                f"<b>g {r['guidance_scale']:g}</b> · seed {r['seed']} · {e(r['scheduler'])} · {r['steps']} steps · "
                f"{r['width']}x{r['height']}"
            )
            search = " ".join(
                [r["prompt"].lower(), f"g{r['guidance_scale']:g}", f"guidance {r['guidance_scale']:g}", f"seed {r['seed']}",
                 r["scheduler"], f"{r['steps']} steps", f"{r['width']}x{r['height']}", r["file"].lower()]
            )
            if r["present"]:
                lazy = "" if n < eager else ' loading="lazy"'
                n += 1
                out.append(
                    f'<figure data-search="{e(search)}" data-file="{e(r["file"])}"><a href="{_q(r["file"])}">'
                    f'<img src="{_q(r["file"])}" width="{r["width"]}" height="{r["height"]}"{lazy} '
                    f'alt="{e(r["prompt"][:120])}, guidance {r["guidance_scale"]:g}, seed {r["seed"]}"></a>'
                    f"<figcaption>{caption}<br>{e(r['file'])}</figcaption></figure>"
                )
            else:
                out.append(
                    f'<figure class="missing" data-search="{e(search)}" data-file="{e(r["file"])}"><div class="ph">not rendered yet</div>'
                    f"<figcaption>{caption}</figcaption></figure>"
                )
        out.append("</div></section>")
    out.append(f"<script>{_JS}</script>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
