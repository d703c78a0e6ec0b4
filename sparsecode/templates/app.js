"use strict";
// The try-it box: POST the text, show each token shaded by a feature's activation. Token text is set as text only.

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function shade(node, a) {
  const alpha = Math.max(0, Math.min(1, a || 0));
  node.style.backgroundColor = "rgba(255, 140, 0, " + alpha.toFixed(3) + ")";
}

function render(out, data, feature, peak) {
  const line = el("div", "ctx tryit-tokens");
  const spans = data.tokens.map(function (t) {
    const s = el("span", "tok", t.text);
    s.title = t.features.map(function (p) { return "#" + p[0] + " " + p[1].toFixed(4); }).join("\n");
    line.append(s);
    return s;
  });
  const caption = el("p", "muted");
  function highlight(f) {
    const vals = data.tokens.map(function (t) {
      if (f === null) return t.features.length ? t.features[0][1] : 0;
      const hit = t.features.find(function (p) { return p[0] === f; });
      return hit ? hit[1] : 0;
    });
    const top = (f === feature && peak > 0) ? peak : Math.max(1e-12, ...vals.map(Math.abs));
    spans.forEach(function (s, i) { shade(s, vals[i] / top); s.dataset.act = String(vals[i]); });
    caption.textContent = f === null ? "shaded by each token's strongest feature; hover a token for its features"
      : "shaded by feature " + f + "; hover a token for its features";
  }
  const list = el("div", "tryit-features");
  list.append(el("span", "muted", "features firing here (tokens, max): "));
  data.features.forEach(function (p) {
    const b = el("button", "show", "#" + p[0]);
    b.type = "button";
    b.title = p[2] + " tokens, max " + p[1].toFixed(4);
    b.addEventListener("click", function () { highlight(p[0]); });
    const a = el("a", "feature-link", "page");
    a.href = "/features/" + encodeURIComponent(String(p[0]));
    list.append(b, a);
  });
  out.replaceChildren(line, caption, list);
  highlight(feature);
}

async function tryIt(form) {
  const out = form.querySelector(".tryit-out");
  const feature = form.dataset.feature !== undefined ? Number(form.dataset.feature) : null;
  out.replaceChildren(el("span", "muted", "running…"));
  let data;
  try {
    const r = await fetch("/api/try", {
      method: "POST", headers: {"content-type": "application/json"},
      body: JSON.stringify({text: form.querySelector("textarea").value, feature: feature}),
    });
    data = await r.json();
    if (!r.ok) throw new Error(data.error || r.statusText);
  } catch (e) {
    out.replaceChildren(el("span", "error", String(e.message || e)));
    return;
  }
  render(out, data, feature, Number(form.dataset.max || 0));
}

document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll("form.tryit").forEach(function (form) {
    form.addEventListener("submit", function (e) { e.preventDefault(); tryIt(form); });
  });
});
