// The mosaic page: OpenSeadragon flies through the mosaic's deep-zoom pyramid; a grid overlay
// labels columns A, B, ... AA and rows 1, 2, ... as the chat preview does; a click, a tap or a
// typed coordinate shows the car behind a tile, and /m/<id>/<tile> opens on that tile.
(() => {
  "use strict";
  const stage = document.getElementById("stage");
  const view = document.getElementById("view");
  const grid = document.getElementById("grid");
  const panel = document.getElementById("panel");
  const statusLine = document.getElementById("status");
  const hoverOut = document.getElementById("hover-coord");
  const id = stage.dataset.id;
  // Label steps as on the chat preview: every tile labelled when there is room, else every 2nd,
  // 5th, 10th...
  const STEPS = [1, 2, 5, 10, 20, 50, 100, 200, 500];
  const BAND = 20;
  const phone = window.matchMedia("(max-width: 700px)");
  let info = null, viewer = null, cellPx = 0, selected = null, hover = null;
  let tileUrl = null;
  // The flat render shown while the deep-zoom pyramid is built (a first view can take a while).
  let placeholder = null;
  // The last answered job of the conversation shown (what a follow-up continues), and a
  // counter that tells a late answer of a conversation no longer shown to stay away.
  let lastJob = null, shown = 0;

  const colLabel = (col) => {
    let s = "";
    for (let n = col + 1; n > 0; n = Math.floor((n - 1) / 26)) {
      s = String.fromCharCode(65 + (n - 1) % 26) + s;
    }
    return s;
  };
  const labelOf = (row, col) => colLabel(col) + (row + 1);
  const show = (el, on) => { el.hidden = !on; };
  const say = (text, isError) => {
    statusLine.textContent = text;
    statusLine.classList.toggle("error", !!isError);
  };

  // Image pixels (the pyramid's deepest level) <-> pixels of the viewer element.
  const toScreen = (x, y) =>
    viewer.viewport.imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));
  const cellAt = (clientX, clientY) => {
    const box = view.getBoundingClientRect();
    const p = viewer.viewport.viewerElementToImageCoordinates(
      new OpenSeadragon.Point(clientX - box.left, clientY - box.top));
    const col = Math.floor(p.x / cellPx), row = Math.floor(p.y / cellPx);
    if (col < 0 || row < 0 || col >= info.cols || row >= info.rows) return null;
    return { row, col };
  };

  // What is on screen, in image pixels, for people reading the DOM (and the browser tests).
  const publishView = () => {
    const a = viewer.viewport.viewerElementToImageCoordinates(new OpenSeadragon.Point(0, 0));
    const b = viewer.viewport.viewerElementToImageCoordinates(
      new OpenSeadragon.Point(view.clientWidth, view.clientHeight));
    stage.dataset.view = [a.x, a.y, b.x - a.x, b.y - a.y].map((v) => v.toFixed(2)).join(",");
    stage.dataset.cellPx = String(cellPx);
  };

  const drawGrid = () => {
    const dpr = window.devicePixelRatio || 1;
    const w = view.clientWidth, h = view.clientHeight;
    if (grid.width !== Math.round(w * dpr) || grid.height !== Math.round(h * dpr)) {
      grid.width = Math.round(w * dpr);
      grid.height = Math.round(h * dpr);
    }
    const g = grid.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, w, h);
    if (!viewer || !cellPx) return;
    const o = toScreen(0, 0), far = toScreen(cellPx, cellPx);
    const cw = far.x - o.x, ch = far.y - o.y;
    g.font = "12px system-ui, sans-serif";
    const widest = Math.max(g.measureText(colLabel(info.cols - 1)).width,
      g.measureText(String(info.rows)).width);
    const left = Math.ceil(widest + 10);
    const step = STEPS.find((s) => s * cw >= widest + 6) || STEPS[STEPS.length - 1];
    const lineStep = cw >= 10 ? 1 : step;
    const c0 = Math.max(0, Math.floor(-o.x / cw)), c1 = Math.min(info.cols, Math.ceil((w - o.x) / cw));
    const r0 = Math.max(0, Math.floor(-o.y / ch)), r1 = Math.min(info.rows, Math.ceil((h - o.y) / ch));
    const top = Math.max(o.y, 0), bottom = Math.min(o.y + info.rows * ch, h);
    const leftEdge = Math.max(o.x, 0), rightEdge = Math.min(o.x + info.cols * cw, w);

    g.strokeStyle = "rgba(255,255,255,0.35)";
    g.lineWidth = 1;
    g.beginPath();
    for (let col = Math.ceil(c0 / lineStep) * lineStep; col <= c1; col += lineStep) {
      const x = Math.round(o.x + col * cw) + 0.5;
      g.moveTo(x, top); g.lineTo(x, bottom);
    }
    for (let row = Math.ceil(r0 / lineStep) * lineStep; row <= r1; row += lineStep) {
      const y = Math.round(o.y + row * ch) + 0.5;
      g.moveTo(leftEdge, y); g.lineTo(rightEdge, y);
    }
    g.stroke();

    const outline = (cell, colour, width) => {
      if (!cell) return;
      const x = o.x + cell.col * cw, y = o.y + cell.row * ch;
      g.lineWidth = width + 2; g.strokeStyle = "rgba(0,0,0,0.6)";
      g.strokeRect(x, y, cw, ch);
      g.lineWidth = width; g.strokeStyle = colour;
      g.strokeRect(x, y, cw, ch);
    };
    outline(hover, "rgba(255,255,255,0.9)", 1.5);
    outline(selected, "#ffd400", 3);

    // Label bands along the top and the left edge, like the preview's margins.
    g.fillStyle = "rgba(246,246,246,0.88)";
    g.fillRect(0, 0, w, BAND);
    g.fillRect(0, BAND, left, h - BAND);
    g.textBaseline = "middle";
    const mark = (text, x, y, align, on) => {
      g.textAlign = align;
      g.font = on ? "bold 12px system-ui, sans-serif" : "12px system-ui, sans-serif";
      g.fillStyle = on ? "#8a5a00" : "#323232";
      g.fillText(text, x, y);
    };
    // Each label sits in the middle of the part of its column (row) that is on screen.
    // A label may spill over its unlabelled neighbours, so a whole cell always gets one.
    const middle = (start, size, low, high, need) => {
      const a = Math.max(start, low), b = Math.min(start + size, high);
      return b - a >= Math.min(need, size - 0.5) ? (a + b) / 2 : null;
    };
    for (let col = Math.floor(c0 / step) * step; col < c1; col += step) {
      const text = colLabel(col);
      const x = middle(o.x + col * cw, cw, left, w, g.measureText(text).width + 4);
      if (x !== null) mark(text, x, BAND / 2, "center", selected && selected.col === col);
    }
    for (let row = Math.floor(r0 / step) * step; row < r1; row += step) {
      const y = middle(o.y + row * ch, ch, BAND, h, 14);
      if (y !== null) mark(String(row + 1), left - 4, y, "right", selected && selected.row === row);
    }
  };

  // On a phone the panel slides up over the lower half: the tile moves into the upper part.
  const abovePanel = (row, col, immediately) => {
    if (!phone.matches) return;
    const b = viewer.viewport.getBounds();
    const p = viewer.viewport.imageToViewportCoordinates((col + 0.5) * cellPx, (row + 0.5) * cellPx);
    viewer.viewport.panTo(new OpenSeadragon.Point(b.x + b.width / 2, p.y + b.height * 0.25),
      immediately);
  };

  // Zoom so the tile and one neighbour on each side fill the view.
  const flyTo = (row, col, immediately) => {
    const m = 1;
    const rect = viewer.viewport.imageToViewportRectangle(
      (col - m) * cellPx, (row - m) * cellPx, (1 + 2 * m) * cellPx, (1 + 2 * m) * cellPx);
    viewer.viewport.fitBounds(rect, immediately);
    const b = viewer.viewport.getBounds();
    if (phone.matches) {
      viewer.viewport.panTo(new OpenSeadragon.Point(b.x + b.width / 2, b.y + b.height * 0.75),
        immediately);
    }
  };

  const facts = { make: "Make", model: "Model", year: "Year", fuel: "Fuel",
    co2_g_km: "CO₂ (g/km)", emission_standard: "Emission standard", file_name: "Photo",
    source: "Source" };

  // Show the car behind a tile: "C7", "c7" or "3,7" (the gallery's API parses and checks it).
  const select = async (coordinate, fly, immediately) => {
    const err = document.getElementById("tile-error");
    const res = await fetch(`/api/mosaics/${id}/tiles/${encodeURIComponent(coordinate)}`);
    if (!res.ok) {
      err.textContent = await res.text();
      show(err, true);
      panel.classList.add("open");
      return;
    }
    show(err, false);
    const tile = await res.json();
    tileUrl = `/api/mosaics/${id}/tiles/${tile.label}`;
    selected = { row: tile.row, col: tile.col };
    // The toolbar names the tile shown, not the one the pointer last crossed.
    hover = null;
    hoverOut.textContent = tile.label;
    document.getElementById("tile-title").textContent = "Tile " + tile.label;
    show(document.getElementById("tile-hint"), false);
    const photo = document.getElementById("car-photo");
    photo.src = tile.photo || `${tileUrl}/photo`;
    photo.alt = "Car photo behind tile " + tile.label;
    photo.dataset.label = tile.label;
    show(photo, true);
    const note = document.getElementById("tile-note");
    note.textContent = tile.note || "";
    show(note, !!tile.note);
    const list = document.getElementById("car-facts");
    list.replaceChildren();
    for (const [key, title] of Object.entries(facts)) {
      const value = tile.car && tile.car[key];
      if (value === null || value === undefined || value === "") continue;
      const dt = document.createElement("dt"); dt.textContent = title;
      const dd = document.createElement("dd"); dd.textContent = value;
      list.append(dt, dd);
    }
    const page = `/m/${id}/${tile.label}`;
    const link = document.getElementById("tile-link");
    link.href = page;
    show(link, true);
    if (location.pathname !== page) history.replaceState(null, "", page);
    show(document.getElementById("ask-form"), true);
    panel.classList.add("open");
    newConversation();
    // Before the pyramid is ready the car is shown at once; the viewer flies there on opening.
    if (!viewer || !cellPx) return;
    if (fly) flyTo(tile.row, tile.col, immediately);
    else abovePanel(tile.row, tile.col, immediately);
    drawGrid();
  };

  const open = (descriptor) => {
    const xml = new DOMParser().parseFromString(descriptor, "application/xml");
    const image = xml.documentElement, size = image.getElementsByTagName("Size")[0];
    const width = Number(size.getAttribute("Width"));
    cellPx = width / info.cols;
    viewer = OpenSeadragon({
      element: document.getElementById("osd"),
      tileSources: { Image: {
        xmlns: "http://schemas.microsoft.com/deepzoom/2008",
        Url: `/api/mosaics/${id}_files/`,
        Format: image.getAttribute("Format"),
        Overlap: image.getAttribute("Overlap"),
        TileSize: image.getAttribute("TileSize"),
        Size: { Width: size.getAttribute("Width"), Height: size.getAttribute("Height") },
      } },
      drawer: "canvas",
      showNavigationControl: false,
      showNavigator: !phone.matches,
      navigatorPosition: "BOTTOM_RIGHT",
      // A click or a tap picks a tile; a double click or a double tap zooms.
      gestureSettingsMouse: { clickToZoom: false, dblClickToZoom: true, scrollToZoom: true },
      gestureSettingsTouch: { clickToZoom: false, dblClickToZoom: true, pinchToZoom: true,
        flickEnabled: true },
      zoomPerScroll: 1.4,
      // Past each car's own pixels, twice over, and no further.
      maxZoomPixelRatio: 2,
      visibilityRatio: 0.5,
      // Room for the grid's label bands along the top and the left edge.
      viewportMargins: { top: BAND + 2, left: 34, right: 2, bottom: 2 },
      animationTime: 0.6,
    });
    viewer.addHandler("open", () => {
      say("");
      if (placeholder) { placeholder.remove(); placeholder = null; }
      if (selected) flyTo(selected.row, selected.col, true);
      publishView();
      drawGrid();
    });
    viewer.addHandler("open-failed", (e) => say("The deep zoom could not be opened: " + e.message, true));
    viewer.addHandler("update-viewport", () => { publishView(); drawGrid(); });
    viewer.addHandler("animation-start", () => { stage.dataset.moving = "1"; });
    viewer.addHandler("animation-finish", () => {
      publishView();
      drawGrid();
      stage.dataset.moving = "0";
    });
    viewer.addHandler("resize", drawGrid);
    viewer.addHandler("canvas-click", (e) => {
      if (!e.quick) return;
      const box = view.getBoundingClientRect();
      const cell = cellAt(box.left + e.position.x, box.top + e.position.y);
      if (cell) select(labelOf(cell.row, cell.col), false);
    });
  };

  view.addEventListener("pointermove", (e) => {
    if (!viewer || !cellPx || e.pointerType === "touch") return;
    const cell = cellAt(e.clientX, e.clientY);
    const text = cell ? labelOf(cell.row, cell.col) : "";
    if (hoverOut.textContent !== text) hoverOut.textContent = text;
    if ((cell && (!hover || hover.row !== cell.row || hover.col !== cell.col)) || (!cell && hover)) {
      hover = cell;
      drawGrid();
    }
  });
  view.addEventListener("pointerleave", () => {
    hover = null;
    hoverOut.textContent = selected ? labelOf(selected.row, selected.col) : "";
    drawGrid();
  });

  document.getElementById("zoom-in").onclick = () => viewer && viewer.viewport.zoomBy(1.6);
  document.getElementById("zoom-out").onclick = () => viewer && viewer.viewport.zoomBy(1 / 1.6);
  document.getElementById("home").onclick = () => viewer && viewer.viewport.goHome();
  document.getElementById("panel-close").onclick = () => panel.classList.remove("open");
  document.getElementById("goto-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = document.getElementById("goto").value.trim();
    if (text && info) select(text, true, false);
  });

  const conversation = document.getElementById("conversation");
  const followUpForm = document.getElementById("follow-up-form");
  const newConversation = () => {
    shown += 1;
    lastJob = null;
    conversation.replaceChildren();
    show(followUpForm, false);
  };

  // The answer text normally ends with its own "Sources: [1] ..." paragraph; the list is
  // written out only for an answer that lacks one, so each source is shown once.
  const withSources = (answer, sources) => {
    if (/(^|\n)Sources:/.test(answer) || !sources.length) return answer;
    const lines = sources.map((s, i) => `[${i + 1}] ${s.title || ""} — ${s.source || ""}`);
    return [answer, "", "Sources:", ...lines].join("\n");
  };
  const reveal = (el) => el.scrollIntoView({ block: "nearest" });

  // One turn: the question, then its answer below the earlier ones once the worker has it.
  // The question box is emptied once the question is accepted (kept if it is refused).
  const askTurn = async (url, form, box) => {
    const mine = shown;
    const turn = document.createElement("div"); turn.className = "turn";
    const question = document.createElement("p"); question.className = "question";
    question.textContent = form.get("question");
    const out = document.createElement("p"); out.className = "answer";
    turn.append(question, out);
    conversation.append(turn);
    show(followUpForm, false);
    reveal(turn);
    const res = await fetch(url, { method: "POST", body: form });
    if (!res.ok) {
      out.textContent = await res.text();
      show(followUpForm, lastJob !== null);
      reveal(turn);
      return;
    }
    box.value = "";
    const { job, position } = await res.json();
    out.textContent = `Queued: you are #${position}.`;
    for (;;) {
      await new Promise((r) => setTimeout(r, 1500));
      if (mine !== shown) return;
      const st = await (await fetch(`/api/jobs/${job}`)).json();
      if (st.status === "queued") out.textContent = `Queued: you are #${st.position}.`;
      else if (st.status === "running") out.textContent = "Thinking about this car…";
      else {
        out.textContent = st.answer ? withSources(st.answer, st.sources || [])
          : (st.error || st.status);
        if (mine !== shown) return;
        if (st.status === "done") lastJob = job;
        show(followUpForm, lastJob !== null);
        reveal(turn);
        return;
      }
    }
  };

  document.getElementById("ask-form").addEventListener("submit", (e) => {
    e.preventDefault();
    newConversation();
    askTurn(tileUrl + "/ask", new FormData(e.target), document.getElementById("question"));
  });

  followUpForm.addEventListener("submit", (e) => {
    e.preventDefault();
    askTurn(`/api/jobs/${lastJob}/follow-up`, new FormData(e.target),
      document.getElementById("follow-up"));
  });

  window.addEventListener("resize", drawGrid);

  (async () => {
    const res = await fetch(`/api/mosaics/${id}`);
    if (!res.ok) { say(await res.text(), true); return; }
    info = await res.json();
    // A tile link shows its car at once: the car does not wait for the pyramid.
    const start = decodeURIComponent(location.pathname.split("/")[3] || "");
    if (start) select(start, true, true);
    // The first view of a mosaic builds its pyramid, which can take a while for a large one;
    // meanwhile the flat render stands in for the deep zoom.
    placeholder = document.createElement("img");
    placeholder.id = "placeholder";
    placeholder.alt = "";
    placeholder.src = `/media/mosaics/${id}/render?w=${Math.max(16, Math.min(2048,
      Math.ceil(view.clientWidth * (window.devicePixelRatio || 1))))}`;
    view.append(placeholder);
    const dzi = await fetch(`/api/mosaics/${id}.dzi`);
    if (!dzi.ok) { say(await dzi.text(), true); return; }
    open(await dzi.text());
  })();
})();
