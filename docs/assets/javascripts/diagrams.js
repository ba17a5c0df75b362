// Renders the ```mermaid blocks of the documentation (pre.diagram, see zensical.toml) as SVG, with the Mermaid
// runtime vendored beside the site (assets/vendor/mermaid.min.js): no CDN, so the site works offline. The
// runtime (5 MB) is loaded only on pages that have a diagram.
(() => {
  "use strict";
  const runtime = new URL("../vendor/mermaid.min.js", document.currentScript.src).href;

  function load() {
    return new Promise((resolve, reject) => {
      const script = document.createElement("script");
      script.src = runtime;
      script.onload = () => resolve(window.mermaid);
      script.onerror = () => reject(new Error(`could not load ${runtime}`));
      document.head.appendChild(script);
    });
  }

  async function render() {
    const blocks = [...document.querySelectorAll("pre.diagram")];
    if (!blocks.length) return;
    const mermaid = await load();
    const dark = document.body.getAttribute("data-md-color-scheme") === "slate";
    mermaid.initialize({startOnLoad: false, securityLevel: "strict", theme: dark ? "dark" : "default",
                        fontFamily: "inherit"});
    for (const [index, block] of blocks.entries()) {
      const figure = document.createElement("div");
      figure.className = "diagram-rendered";
      try {
        const {svg} = await mermaid.render(`diagram-${index}`, block.textContent);
        figure.innerHTML = svg;
      } catch (error) {
        figure.className = "diagram-error";
        figure.textContent = `This diagram could not be drawn: ${error.message}`;
      }
      block.replaceWith(figure);
    }
    document.body.dataset.diagrams = "rendered";
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", render);
  else render();
})();
