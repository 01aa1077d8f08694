// Text that fails WCAG 2 contrast: 4.5:1, or 3:1 for large text, against the colour
// actually behind it (translucent backgrounds and opacity composited). Disabled controls
// and visually hidden text are exempt, as in WCAG. Evaluated by test_playground.py.
() => {
    const parse = (c) => {
        const p = c.match(/rgba?\(([^)]*)\)/)[1].split(/[\s,\/]+/).filter(Boolean).map(Number);
        return { r: p[0], g: p[1], b: p[2], a: p.length > 3 ? p[3] : 1 };
    };
    const over = (top, under) => ({
        r: top.r * top.a + under.r * (1 - top.a),
        g: top.g * top.a + under.g * (1 - top.a),
        b: top.b * top.a + under.b * (1 - top.a),
        a: 1,
    });
    const backdrop = (el) => {
        const layers = [];
        for (let n = el; n; n = n.parentElement) {
            const c = parse(getComputedStyle(n).backgroundColor);
            if (c.a > 0) layers.push(c);
            if (c.a >= 1) break;
        }
        return layers.reverse().reduce((under, top) => over(top, under), { r: 255, g: 255, b: 255, a: 1 });
    };
    const opacity = (el) => {
        let o = 1;
        for (let n = el; n; n = n.parentElement) o *= Number(getComputedStyle(n).opacity);
        return o;
    };
    const lum = ({ r, g, b }) => {
        const f = (v) => ((v /= 255) <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4);
        return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
    };
    const ratio = (x, y) => {
        const [hi, lo] = [lum(x), lum(y)].sort((a, b) => b - a);
        return (hi + 0.05) / (lo + 0.05);
    };
    const failures = [];
    const check = (el, text) => {
        if (!text.trim() || !el.checkVisibility({ opacityProperty: true, visibilityProperty: true })) return;
        if (el.closest(":disabled, .visually-hidden")) return;
        const style = getComputedStyle(el);
        const bg = backdrop(el);
        const fg = parse(style.color);
        const seen = over({ ...fg, a: fg.a * opacity(el) }, bg);
        const size = parseFloat(style.fontSize);
        const large = size >= 24 || (Number(style.fontWeight) >= 700 && size >= 18.66);
        const needed = large ? 3 : 4.5;
        const got = ratio(seen, bg);
        if (got < needed) failures.push(`${el.tagName}.${el.className} "${text.trim().slice(0, 24)}" ${got.toFixed(2)}`);
    };
    const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) check(node.parentElement, node.textContent);
    for (const el of document.querySelectorAll("input:not([type=range]), textarea")) check(el, el.value || el.placeholder);
    return failures;
}
