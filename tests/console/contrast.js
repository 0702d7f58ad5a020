// WCAG 2.1 contrast of every visible text on the page (tests/console/test_contrast.py runs this in the browser).
// For each text node and each form control showing a value or placeholder: its computed colour against the
// effective background, found by compositing the backgrounds of it and its ancestors (transparent ones let the
// next one show through) over the white canvas. Opacity of the element and its ancestors fades the text.
// Disabled controls are skipped (WCAG exempts inactive components); canvas charts hold no DOM text.
() => {
  const rgba = (css) => {
    const m = css.match(/rgba?\(([^)]+)\)/);
    if (!m) return null;
    const p = m[1].split(/[\s,/]+/).filter(Boolean).map(parseFloat);
    return [p[0], p[1], p[2], p.length > 3 ? p[3] : 1];
  };
  const over = (top, under) => [0, 1, 2].map((i) => top[i] * top[3] + under[i] * (1 - top[3])).concat([1]);
  const lum = (c) => {
    const [r, g, b] = c.slice(0, 3).map((v) => {
      const s = v / 255;
      return s <= 0.03928 ? s / 12.92 : ((s + 0.055) / 1.055) ** 2.4;
    });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  };
  const ratio = (a, b) => {
    const [hi, lo] = [lum(a), lum(b)].sort((x, y) => y - x);
    return (hi + 0.05) / (lo + 0.05);
  };
  const name = (el) => el.tagName.toLowerCase() + (el.className && typeof el.className === 'string'
    ? '.' + el.className.trim().split(/\s+/).join('.') : '');
  const background = (el) => {
    const layers = [];
    let opacity = 1;
    for (let e = el; e; e = e.parentElement) {
      const style = getComputedStyle(e);
      opacity *= parseFloat(style.opacity);
      if (style.backgroundImage !== 'none') return { image: name(e) };
      const c = rgba(style.backgroundColor);
      if (c && c[3] > 0) layers.push(c);
    }
    let bg = [255, 255, 255, 1];
    for (const layer of layers.reverse()) bg = over(layer, bg);
    return { bg, opacity };
  };
  const results = [];
  const check = (el, text, colour) => {
    const rect = el.getBoundingClientRect();
    const style = getComputedStyle(el);
    if (!rect.width || !rect.height || style.visibility !== 'visible') return;
    if (el.closest(':disabled, [aria-disabled=true]')) return;
    const { bg, opacity, image } = background(el);
    const size = parseFloat(style.fontSize);
    const large = size >= 24 || (size >= 18.66 && parseInt(style.fontWeight, 10) >= 700);
    const need = large ? 3 : 4.5;
    if (image) {
      results.push({ text, element: name(el), ratio: 0, need, note: `background image on ${image}` });
      return;
    }
    const fg = rgba(colour);
    const seen = over([fg[0], fg[1], fg[2], fg[3] * opacity], bg);
    results.push({ text, element: name(el), fg: colour, bg: `rgb(${bg.slice(0, 3).map(Math.round)})`,
      ratio: Math.round(ratio(seen, bg) * 100) / 100, need });
  };
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const el = node.parentElement;
    const text = node.textContent.trim();
    if (!text || !el || el.closest('script, style, option, select, textarea')) continue;
    check(el, text.slice(0, 40), getComputedStyle(el).color);
  }
  for (const el of document.querySelectorAll('input, select, textarea')) {
    if (['checkbox', 'radio', 'hidden', 'file', 'range', 'color'].includes(el.type)) continue;
    if (el.value) check(el, el.value.slice(0, 40), getComputedStyle(el).color);
    else if (el.placeholder) check(el, el.placeholder.slice(0, 40), getComputedStyle(el, '::placeholder').color);
  }
  return results;
}
