/* The comparison page of saliency-server: plain JavaScript (no build step, no dependency), talking to the public API
   only: GET v1/models and v1/methods for the choices, POST v1/models/{id}/explain once per model for the grid. URLs are
   relative, so the page works behind a path prefix too. */
"use strict";

(() => {
  const KEY_STORAGE = "saliency-server.api-key";
  const MAX_ATTEMPTS = 4; // per model, while the server answers 503 with Retry-After (warming up, queue full)
  const MAX_RETRY_WAIT_S = 30;
  const FORMATS = ["overlay_png", "raw"];
  const DEFAULT_METHODS = ["gradcam", "rollout"];
  const DEFAULT_SAMPLE = "chelsea";
  const GRADIENTS = new Set(["jet", "RdBu_r", "viridis", "gray", "magma", "inferno", "plasma"]);

  const state = {
    models: [],
    methods: [],
    metrics: [],
    loaded: false,
    image: null, // {blob, name, url}
    forms: new Map(), // method name -> {checkbox, fields, block}
    run: null, // the run whose requests are in flight
  };

  // -- small helpers ----------------------------------------------------------------------------------------------

  const $ = (id) => document.getElementById(id);
  const PROPERTIES = new Set(["checked", "value", "disabled", "hidden", "selected", "title"]);

  function h(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (value === undefined || value === null) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else if (key.startsWith("on") && typeof value === "function") node.addEventListener(key.slice(2), value);
      else if (PROPERTIES.has(key)) node[key] = value;
      else if (value !== false) node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function fmt(value) {
    if (value === null || value === undefined) return "–";
    if (Number.isNaN(value)) return "NaN";
    if (!Number.isFinite(value)) return String(value);
    const magnitude = Math.abs(value);
    if (magnitude !== 0 && (magnitude >= 1e4 || magnitude < 1e-3)) return value.toExponential(2);
    return Number(value.toPrecision(3)).toString();
  }

  const fmtSeconds = (ms) => `${(ms / 1000).toFixed(1)} s`;
  const fmtMs = (ms) => (ms >= 1000 ? fmtSeconds(ms) : `${Math.round(ms)} ms`);
  const percent = (p) => `${(100 * p).toFixed(p >= 0.1 ? 1 : 2)}%`;

  function sleep(seconds, signal) {
    return new Promise((resolve) => {
      const timer = setTimeout(() => resolve(true), seconds * 1000);
      signal?.addEventListener("abort", () => { clearTimeout(timer); resolve(false); }, { once: true });
    });
  }

  function base64Bytes(text) {
    const binary = atob(text);
    const bytes = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
    return bytes;
  }

  function download(blob, filename) {
    const url = URL.createObjectURL(blob);
    const link = h("a", { href: url, download: filename, hidden: true });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }

  const safeName = (text) => String(text).replace(/[^A-Za-z0-9._-]+/g, "_");

  // -- the API ----------------------------------------------------------------------------------------------------

  class ApiFailure extends Error {
    constructor(status, code, message, requestId = null, retryAfter = null) {
      super(message);
      this.status = status;
      this.code = code;
      this.requestId = requestId;
      this.retryAfter = retryAfter;
    }

    describe() {
      const status = this.status ? `${this.status} ` : "";
      const id = this.requestId ? ` (request id ${this.requestId})` : "";
      return `${status}${this.code}: ${this.message}${id}`;
    }
  }

  function retryAfterSeconds(response) {
    const value = response.headers.get("Retry-After");
    if (!value) return null;
    const seconds = Number(value);
    if (Number.isFinite(seconds)) return Math.max(0, seconds);
    const date = Date.parse(value);
    return Number.isNaN(date) ? null : Math.max(0, (date - Date.now()) / 1000);
  }

  async function api(path, init = {}) {
    const headers = new Headers(init.headers || {});
    const key = sessionStorage.getItem(KEY_STORAGE);
    if (key) headers.set("Authorization", `Bearer ${key}`);
    let response;
    let text;
    try {
      response = await fetch(path, { ...init, headers });
      text = await response.text();
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new ApiFailure(0, "network_error", `the server could not be reached (${error.message})`);
    }
    let body = null;
    try { body = text ? JSON.parse(text) : null; } catch { body = null; }
    if (response.ok) {
      if (body === null) throw new ApiFailure(response.status, "invalid_response", "the answer is not JSON");
      return body;
    }
    const envelope = body && typeof body.error === "object" && body.error !== null ? body.error : {};
    const message = envelope.message || (typeof body?.error === "string" ? body.error : "")
      || response.statusText || "the request failed";
    throw new ApiFailure(response.status, envelope.code || `http_${response.status}`, message,
      envelope.request_id || response.headers.get("X-Request-ID"), retryAfterSeconds(response));
  }

  // -- banner and API key -----------------------------------------------------------------------------------------

  function showBanner(message, kind = "error", actions = []) {
    const banner = $("banner");
    banner.className = `banner ${kind}`;
    banner.replaceChildren(h("span", { text: message }),
      ...actions.map(([label, action]) => h("button", { type: "button", text: label, onclick: action })));
    banner.hidden = false;
  }

  function hideBanner() { $("banner").hidden = true; }

  function showAuth(failure) {
    $("auth").hidden = false;
    const stored = sessionStorage.getItem(KEY_STORAGE);
    $("auth-message").textContent = `${failure.describe()}${stored && failure.code === "invalid_api_key"
      ? " — the key kept for this tab was refused: enter another." : ""}`;
    $("api-key").focus();
  }

  function updateKeyIndicator() { $("key-indicator").hidden = !sessionStorage.getItem(KEY_STORAGE); }

  function setupAuth() {
    $("auth-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const key = $("api-key").value.trim();
      if (!key) return;
      sessionStorage.setItem(KEY_STORAGE, key);
      $("api-key").value = "";
      $("auth").hidden = true;
      updateKeyIndicator();
      if (!state.loaded) loadCatalogue();
      else showBanner("API key kept for this tab: press Explain again.", "info");
    });
    $("key-forget").addEventListener("click", () => {
      sessionStorage.removeItem(KEY_STORAGE);
      updateKeyIndicator();
    });
    updateKeyIndicator();
  }

  // -- the catalogue: models, methods, metrics --------------------------------------------------------------------

  async function loadCatalogue() {
    hideBanner();
    try {
      const [models, methods] = await Promise.all([api("v1/models"), api("v1/methods")]);
      state.models = models.models;
      state.methods = methods.methods;
      state.metrics = methods.evaluation_metrics || [];
      state.loaded = true;
      renderModels();
      renderMethods();
      renderMetrics();
      refreshApplicability();
    } catch (error) {
      if (error.status === 401) { showAuth(error); return; }
      const text = error instanceof ApiFailure ? error.describe() : String(error);
      showBanner(`Could not load the models and methods: ${text}`, "error", [["Retry", loadCatalogue]]);
    }
  }

  function renderModels() {
    const box = $("models");
    box.replaceChildren();
    if (!state.models.length) box.append(h("span", { class: "hint", text: "This server serves no model." }));
    for (const model of state.models) {
      box.append(h("label", { class: "choice", title: `${model.architecture}, ${model.num_classes} classes, ${model.device}` },
        h("input", { type: "checkbox", name: "model", value: model.id, checked: true, onchange: refreshApplicability }),
        h("span", { class: "choice-name", text: model.id }),
        h("span", { class: `chip ${model.family}`, text: model.family }),
        h("span", { class: "hint", text: `${model.input_size.slice(1).join("×")}` }),
        model.weights.random ? h("span", { class: "chip warn", text: "random weights",
          title: model.weights.note || "random weights: its predictions are meaningless" }) : null,
        model.ready ? null : h("span", { class: "chip warn", text: "warming up" })));
    }
  }

  function renderMetrics() {
    const box = $("evaluate");
    box.replaceChildren();
    for (const metric of state.metrics) {
      box.append(h("label", { class: "inline-choice", title: `${metric.description} (${metric.forward_passes} forward passes per map)` },
        h("input", { type: "checkbox", name: "evaluate", value: metric.name }),
        metric.name.replace(/_/g, " ")));
    }
    if (!state.metrics.length) box.append(h("span", { class: "hint", text: "none offered" }));
  }

  function renderMethods() {
    const box = $("methods");
    box.replaceChildren();
    state.forms.clear();
    for (const method of state.methods) {
      const checked = DEFAULT_METHODS.includes(method.name);
      const fields = paramFields(method);
      const params = h("div", { class: "params", hidden: !checked },
        h("p", { class: "description", text: method.description }),
        fields.length ? fields.map((field) => field.row) : h("span", { class: "hint", text: "No parameters." }));
      const checkbox = h("input", { type: "checkbox", name: "method", value: method.name, checked,
        onchange: () => { params.hidden = !checkbox.checked; } });
      const cost = method.cost_note || `about ${fmt(method.reference_cost)} forward passes on the reference model`;
      const block = h("div", { class: "method", dataset: { method: method.name } },
        h("label", { class: "choice", title: `${method.description}\nCost: ${cost}` },
          checkbox,
          h("span", { class: "choice-name", text: method.name }),
          method.families.map((family) => h("span", { class: `chip ${family}`, text: family })),
          h("span", { class: "hint", text: method.class_specific ? "per class" : "class-agnostic" }),
          h("span", { class: "applicability hint" })),
        params);
      state.forms.set(method.name, { method, checkbox, fields, block });
      box.append(block);
    }
  }

  function refreshApplicability() {
    const families = new Set(selectedModels().map((model) => model.family));
    for (const { method, block } of state.forms.values()) {
      const applies = method.families.some((family) => families.has(family));
      block.classList.toggle("inapplicable", !applies);
      block.querySelector(".applicability").textContent = applies ? ""
        : `· no ticked model is a ${method.families.join(" or ")}`;
    }
  }

  // -- method params as form fields (from each method's JSON schema) ---------------------------------------------

  class FieldError extends Error {
    constructor(field, message) { super(message); this.field = field; }
  }

  function resolveRef(schema, root) {
    if (schema && schema.$ref) return (root.$defs || {})[schema.$ref.split("/").pop()] || {};
    return schema || {};
  }

  /** The field's shape: {type, nullable, schema}, where type is enum, boolean, integer, number, string, list or json. */
  function fieldShape(property, root) {
    let schema = resolveRef(property, root);
    let nullable = false;
    const options = schema.anyOf || schema.oneOf;
    if (options) {
      const concrete = options.filter((option) => option.type !== "null");
      nullable = concrete.length < options.length;
      if (concrete.length !== 1) return { type: "json", nullable, schema };
      schema = { ...resolveRef(concrete[0], root), default: property.default, description: property.description };
    }
    if (Array.isArray(schema.enum)) return { type: "enum", nullable, schema };
    if (["boolean", "integer", "number", "string"].includes(schema.type)) return { type: schema.type, nullable, schema };
    if (schema.type === "array") {
      const items = resolveRef(schema.items, root);
      const primitive = ["integer", "number", "string"].includes(items.type);
      return { type: primitive ? "list" : "json", nullable, schema, items };
    }
    return { type: "json", nullable, schema };
  }

  function boundsText(schema) {
    const low = schema.minimum !== undefined ? `${schema.minimum} ≤ ` : schema.exclusiveMinimum !== undefined
      ? `${schema.exclusiveMinimum} < ` : "";
    const high = schema.maximum !== undefined ? ` ≤ ${schema.maximum}` : schema.exclusiveMaximum !== undefined
      ? ` < ${schema.exclusiveMaximum}` : "";
    return low || high ? `${low}x${high}` : "";
  }

  function paramFields(method) {
    const root = method.params_schema || {};
    return Object.entries(root.properties || {}).map(([name, property]) => paramField(method, name, property, root));
  }

  function paramField(method, name, property, root) {
    const shape = fieldShape(property, root);
    const { schema } = shape;
    const fallback = property.default;
    const id = `param-${method.name}-${name}`;
    const fieldInfo = { method: method.name, name };
    let input;
    let read; // () => [set, value]
    let hint = "";
    if (shape.type === "enum") {
      const choices = shape.nullable && fallback === null ? [["", "(default)"]] : [];
      input = h("select", { id }, [...choices, ...schema.enum.map((value) => [String(value), String(value)])]
        .map(([value, label]) => h("option", { value, text: label, selected: value === String(fallback ?? "") })));
      read = () => {
        if (input.value === "") return [false];
        const value = schema.enum.find((option) => String(option) === input.value);
        return [value !== fallback, value];
      };
    } else if (shape.type === "boolean") {
      input = h("input", { id, type: "checkbox", checked: Boolean(fallback) });
      read = () => [input.checked !== Boolean(fallback), input.checked];
    } else if (shape.type === "integer" || shape.type === "number") {
      input = h("input", { id, type: "number", step: shape.type === "integer" ? "1" : "any",
        min: schema.minimum ?? schema.exclusiveMinimum, max: schema.maximum ?? schema.exclusiveMaximum,
        value: fallback ?? "", placeholder: fallback === null ? "default" : null });
      hint = boundsText(schema);
      read = () => {
        const text = input.value.trim();
        if (text === "") {
          if (input.validity.badInput) throw new FieldError(fieldInfo, `${name}: not a number`);
          return [false];
        }
        const value = Number(text);
        return [value !== fallback, value];
      };
    } else if (shape.type === "list") {
      input = h("input", { id, type: "text", spellcheck: false, value: Array.isArray(fallback) ? fallback.join(", ") : "",
        placeholder: fallback === null ? "default (comma-separated values)" : "comma-separated values" });
      hint = [shape.items.type === "integer" ? "integers" : shape.items.type, boundsText(schema.items || {})]
        .filter(Boolean).join(", ");
      read = () => {
        const text = input.value.trim();
        if (text === "") return [false];
        const numeric = shape.items.type === "integer" || shape.items.type === "number";
        const value = text.split(/[\s,]+/).filter(Boolean).map((item) => (numeric && item.trim() !== "" && !Number.isNaN(Number(item)) ? Number(item) : item));
        return [JSON.stringify(value) !== JSON.stringify(fallback), value];
      };
    } else if (shape.type === "string") {
      input = h("input", { id, type: "text", spellcheck: false, value: fallback ?? "",
        placeholder: fallback === null || fallback === undefined ? "default" : null });
      read = () => {
        const text = input.value.trim();
        if (text === "") return [false];
        return [text !== fallback, text];
      };
    } else {
      input = h("input", { id, type: "text", spellcheck: false, class: "json",
        value: fallback === null || fallback === undefined ? "" : JSON.stringify(fallback),
        placeholder: fallback === null || fallback === undefined ? "default (JSON)" : "JSON" });
      hint = "JSON";
      read = () => {
        const text = input.value.trim();
        if (text === "") return [false];
        let value;
        try { value = JSON.parse(text); } catch { value = text; } // sent as it is: the server's message names it
        return [JSON.stringify(value) !== JSON.stringify(fallback), value];
      };
    }
    input.dataset.param = name;
    const error = h("div", { class: "field-error", hidden: true });
    const row = h("div", { class: "param", title: schema.description || property.description || "" },
      h("label", { for: id, text: name }), input, hint ? h("span", { class: "hint", text: hint }) : null, error);
    return { name, row, input, error, read };
  }

  function readParams(name) {
    const { fields } = state.forms.get(name);
    const params = {};
    for (const field of fields) {
      const [set, value] = field.read();
      if (set) params[field.name] = value;
    }
    return params;
  }

  // -- options ----------------------------------------------------------------------------------------------------

  function setupOptions() {
    const kind = $("target-kind");
    const value = $("target-value");
    kind.addEventListener("change", () => {
      value.hidden = kind.value === "top1";
      value.placeholder = { top_k: "k (1 to 10)", index: "class index", label: "a label, e.g. tabby" }[kind.value] || "";
      if (kind.value === "top_k" && !value.value) value.value = "2";
    });
    $("alpha").addEventListener("input", () => { $("alpha-value").textContent = $("alpha").value; });
  }

  function readTarget() {
    const kind = $("target-kind").value;
    const text = $("target-value").value.trim();
    if (kind === "top_k") return { top_k: Number(text || "2") };
    if (kind === "index") return /^-?\d+$/.test(text) ? Number(text) : text;
    if (kind === "label") return text;
    return "top1";
  }

  function readOptions() {
    const output = { format: FORMATS, space: $("space").value, sign: $("sign").value, alpha: Number($("alpha").value) };
    const colormap = $("colormap").value.trim();
    if (colormap) output.colormap = colormap;
    const maxSide = $("max-side").value.trim();
    if (maxSide) output.max_side = Number(maxSide);
    const evaluate = [...document.querySelectorAll("input[name=evaluate]:checked")].map((box) => box.value);
    const topK = $("top-k").value.trim();
    return { target: readTarget(), output, evaluate, top_k: topK ? Number(topK) : null };
  }

  function optionsForm(options, applicable) {
    const form = new FormData();
    form.append("methods", JSON.stringify(applicable.map(({ name, params }) => (Object.keys(params).length ? { name, params } : name))));
    const target = options.target;
    form.append("target", typeof target === "object" ? JSON.stringify(target) : String(target));
    form.append("output", JSON.stringify(options.output));
    if (options.top_k !== null) form.append("top_k", String(options.top_k));
    if (options.evaluate.length) form.append("evaluate", JSON.stringify(options.evaluate));
    return form;
  }

  // -- the image --------------------------------------------------------------------------------------------------

  function setImage(blob, name, sample = null) {
    if (state.image?.url) URL.revokeObjectURL(state.image.url);
    const url = URL.createObjectURL(blob);
    state.image = { blob, name, url };
    const preview = $("preview");
    preview.src = url;
    preview.alt = name;
    preview.hidden = false;
    $("image-name").textContent = `${name} · ${Math.max(1, Math.round(blob.size / 1024))} KB`;
    for (const button of document.querySelectorAll(".sample")) {
      button.classList.toggle("selected", button.dataset.sample === sample);
    }
  }

  async function loadSample(name) {
    try {
      const response = await fetch(`static/ui/samples/${encodeURIComponent(name)}.jpg`);
      if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
      setImage(await response.blob(), `${name}.jpg`, name);
    } catch (error) {
      showBanner(`Could not load the sample ${name}: ${error.message}`);
    }
  }

  function setupImage() {
    const zone = $("dropzone");
    $("file-input").addEventListener("change", (event) => {
      const [file] = event.target.files;
      if (file) setImage(file, file.name);
    });
    for (const type of ["dragenter", "dragover"]) {
      zone.addEventListener(type, (event) => { event.preventDefault(); zone.classList.add("dragging"); });
    }
    for (const type of ["dragleave", "drop"]) {
      zone.addEventListener(type, () => zone.classList.remove("dragging"));
    }
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      const [file] = event.dataTransfer.files;
      if (file) setImage(file, file.name);
    });
    document.addEventListener("paste", (event) => {
      const item = [...(event.clipboardData?.items || [])].find((entry) => entry.type.startsWith("image/"));
      const file = item?.getAsFile();
      if (file) setImage(file, file.name || "pasted image");
    });
    for (const button of document.querySelectorAll(".sample")) {
      button.addEventListener("click", () => loadSample(button.dataset.sample));
    }
  }

  // -- running: one explain request per model ---------------------------------------------------------------------

  function selectedModels() {
    const ids = new Set([...document.querySelectorAll("input[name=model]:checked")].map((box) => box.value));
    return state.models.filter((model) => ids.has(model.id));
  }

  function selectedMethods() {
    return state.methods.filter((method) => state.forms.get(method.name)?.checkbox.checked);
  }

  function clearFieldErrors() {
    for (const node of document.querySelectorAll(".field-error")) { node.hidden = true; node.textContent = ""; }
    for (const node of document.querySelectorAll(".invalid")) node.classList.remove("invalid");
  }

  function markParam(method, param, message) {
    const form = state.forms.get(method);
    if (!form) return;
    const field = form.fields.find((candidate) => candidate.name === param);
    if (!field) return;
    field.input.classList.add("invalid");
    field.error.hidden = false;
    field.error.textContent = field.error.textContent ? `${field.error.textContent}; ${message}` : message;
    form.block.querySelector(".params").hidden = false;
  }

  function markOption(name) {
    for (const node of document.querySelectorAll(`[data-field="${name}"]`)) node.classList.add("invalid");
  }

  async function start(event) {
    event.preventDefault();
    if (state.run?.active) return;
    clearFieldErrors();
    hideBanner();
    if (!state.loaded) { showBanner("The models and methods are not loaded yet.", "error", [["Retry", loadCatalogue]]); return; }
    if (!state.image) { showBanner("Pick an image first: drop one, choose a file or click a sample."); return; }
    const models = selectedModels();
    const methods = selectedMethods();
    if (!models.length || !methods.length) { showBanner("Tick at least one model and one method."); return; }
    let specs;
    try {
      specs = methods.map((method) => ({ name: method.name, params: readParams(method.name), families: method.families }));
    } catch (error) {
      if (!(error instanceof FieldError)) throw error;
      markParam(error.field.method, error.field.name, error.message);
      return;
    }
    const run = { models, methods, specs, options: readOptions(), image: state.image, columns: new Map() };
    buildGrid(run);
    await execute(run, models);
  }

  async function execute(run, models) {
    run.controller = new AbortController();
    run.active = true;
    run.pending = models.length;
    run.total = models.length;
    run.started = performance.now();
    state.run = run;
    setRunning(true);
    const timer = setInterval(() => updateProgress(run), 100);
    updateProgress(run);
    await Promise.all(models.map(async (model) => {
      try { await explainModel(run, model); } finally { run.pending -= 1; updateProgress(run); }
    }));
    clearInterval(timer);
    run.active = false;
    setRunning(false);
    updateProgress(run);
  }

  function setRunning(running) {
    $("run").disabled = running;
    $("cancel").hidden = !running;
    $("progress").hidden = false;
    $("progress").classList.toggle("busy", running);
    $("results").setAttribute("aria-busy", String(running));
  }

  function updateProgress(run) {
    const answered = run.total - run.pending;
    $("progress-bar").max = run.total;
    $("progress-bar").value = answered;
    const elapsed = fmtSeconds(performance.now() - run.started);
    $("progress-text").textContent = run.active
      ? `${answered} of ${run.total} model${run.total === 1 ? "" : "s"} answered · ${elapsed}`
      : `done in ${elapsed}`;
    for (const column of run.columns.values()) column.tick?.();
  }

  async function explainModel(run, model) {
    const column = run.columns.get(model.id);
    const applicable = run.specs.filter((spec) => spec.families.includes(model.family));
    if (!applicable.length) {
      column.status(`none of the ticked methods applies to ${model.family} models`, "muted");
      return;
    }
    column.pending(applicable);
    const form = optionsForm(run.options, applicable);
    form.append("file", run.image.blob, run.image.name);
    for (let attempt = 1; ; attempt++) {
      try {
        const response = await api(`v1/models/${encodeURIComponent(model.id)}/explain`,
          { method: "POST", body: form, signal: run.controller.signal });
        column.answer(response, applicable);
        return;
      } catch (error) {
        if (error.name === "AbortError") { column.failure(null, applicable, "Cancelled."); return; }
        if (!(error instanceof ApiFailure)) error = new ApiFailure(0, "page_error", String(error.message || error));
        const retriable = error.status === 503 && error.retryAfter !== null && error.code !== "model_unavailable";
        if (retriable && attempt < MAX_ATTEMPTS) {
          let wait = Math.max(1, Math.ceil(Math.min(error.retryAfter, MAX_RETRY_WAIT_S)));
          while (wait > 0) {
            column.status(`${error.describe()}. Retrying in ${wait} s (attempt ${attempt + 1} of ${MAX_ATTEMPTS})…`, "warn");
            if (!(await sleep(1, run.controller.signal))) { column.failure(null, applicable, "Cancelled."); return; }
            wait -= 1;
          }
          column.pending(applicable, ` (attempt ${attempt + 1} of ${MAX_ATTEMPTS})`);
          continue;
        }
        if (error.status === 401) showAuth(error);
        column.failure(error, applicable);
        return;
      }
    }
  }

  // -- the grid: a column per model, a row per method --------------------------------------------------------------

  function paramsText(spec) {
    const entries = Object.entries(spec.params);
    return entries.length ? entries.map(([key, value]) => `${key}=${JSON.stringify(value)}`).join(", ") : "defaults";
  }

  function buildGrid(run) {
    const results = $("results");
    const head = h("tr", {}, h("th", { class: "corner", scope: "col", text: "method \\ model" }));
    const predictions = h("tr", { class: "predictions-row" }, h("th", { scope: "row", text: "predictions" }));
    const rows = new Map(run.methods.map((method, index) => [method.name, h("tr", { class: "method-row", dataset: { method: method.name } },
      h("th", { scope: "row" }, h("div", { class: "method-name", text: method.name }),
        h("div", { class: "hint", text: paramsText(run.specs[index]) })))]));
    for (const model of run.models) {
      const column = makeColumn(run, model);
      run.columns.set(model.id, column);
      head.append(column.header);
      predictions.append(column.predictions);
      for (const method of run.methods) rows.get(method.name).append(column.cell(method));
    }
    const table = h("table", { class: "grid" }, h("thead", {}, head), h("tbody", {}, predictions, ...rows.values()));
    results.replaceChildren(h("div", { class: "grid-scroll" }, table));
  }

  function makeColumn(run, model) {
    const statusLine = h("div", { class: "column-status" });
    const retry = h("button", { type: "button", class: "retry", text: "Retry", hidden: true,
      onclick: () => { if (!state.run?.active) execute(run, [model]); } });
    const header = h("th", { scope: "col", class: "model-head", dataset: { model: model.id } },
      h("div", { class: "model-name" }, h("span", { text: model.id }), h("span", { class: `chip ${model.family}`, text: model.family }),
        model.weights.random ? h("span", { class: "chip warn", text: "random weights", title: model.weights.note || "" }) : null),
      statusLine, retry);
    const predictions = h("td", { class: "predictions", dataset: { model: model.id } });
    const cells = new Map();
    let since = null; // when the request in flight was sent
    let note = "";

    const column = {
      header,
      predictions,
      cell(method) {
        const applies = method.families.includes(model.family);
        const cell = h("td", { class: applies ? "map-cell" : "map-cell na", dataset: { model: model.id, method: method.name } },
          applies ? null : h("div", { class: "na-text", text: `n/a: ${method.name} applies to ${method.families.join(" and ")} models` }));
        cells.set(method.name, cell);
        return cell;
      },
      status(text, kind = "") {
        since = null;
        statusLine.className = `column-status ${kind}`;
        statusLine.textContent = text;
      },
      tick() {
        if (since !== null) statusLine.textContent = `computing${note}… ${fmtSeconds(performance.now() - since)}`;
      },
      pending(applicable, attempt = "") {
        retry.hidden = true;
        since = performance.now();
        note = attempt;
        statusLine.className = "column-status busy";
        statusLine.textContent = `computing${note}…`;
        predictions.replaceChildren(h("div", { class: "spinner", "aria-label": "waiting" }));
        for (const spec of applicable) cells.get(spec.name).replaceChildren(h("div", { class: "spinner", "aria-label": "waiting" }));
      },
      answer(response, applicable) {
        since = null;
        const timings = response.timings;
        column.status(`answered in ${fmtMs(timings.total_ms)} · compute ${fmtMs(timings.compute_ms)} · `
          + `queue ${fmtMs(timings.queue_ms)} · batch of ${timings.batch_size}`, "ok");
        predictions.replaceChildren(renderPredictions(response));
        response.explanations.forEach((result, index) => {
          const spec = applicable[index];
          const cell = cells.get(spec?.name ?? result.method);
          if (cell) cell.replaceChildren(renderMethod(run, model, response, result));
        });
      },
      failure(error, applicable, text = null) {
        since = null;
        const message = text ?? error.describe();
        column.status(error ? `refused: ${error.status ? `${error.status} ` : ""}${error.code} (below)` : message, "error");
        retry.hidden = error === null ? false : ![0, 401, 503, 504].includes(error.status);
        predictions.replaceChildren(h("div", { class: "error-text", text: message }));
        const attributed = new Map(); // method -> its parts of the message
        if (error && error.status === 422) {
          for (const part of error.message.split("; ")) {
            const match = /^methods\[(\d+)\](?:\.params(?:\.([A-Za-z0-9_]+))?)?/.exec(part);
            const spec = match ? applicable[Number(match[1])] : null;
            if (spec) {
              attributed.set(spec.name, [...(attributed.get(spec.name) || []), part]);
              if (match[2]) markParam(spec.name, match[2], part);
            } else {
              const option = /^(target|top_k|evaluate|output\.[a-z_]+)/.exec(part);
              if (option) markOption(option[1]);
            }
          }
        }
        for (const spec of applicable) {
          const parts = attributed.get(spec.name);
          cells.get(spec.name).replaceChildren(parts
            ? h("div", { class: "error-text cell-error", text: parts.join("; ") })
            : h("div", { class: "hint", text: error ? "not computed: the request was refused (see the column's heading)" : message }));
        }
      },
    };
    return column;
  }

  function renderPredictions(response) {
    const top = response.predictions[0]?.probability || 1;
    return h("ol", { class: "prediction-list" }, response.predictions.map((prediction) => {
      const bar = h("span", { class: "bar" });
      bar.style.width = `${Math.max(1, (100 * prediction.probability) / top)}%`;
      return h("li", { title: `class ${prediction.index}` },
        h("span", { class: "label", text: prediction.label }),
        h("span", { class: "probability", text: percent(prediction.probability) }),
        h("span", { class: "bar-track" }, bar));
    }));
  }

  function renderMethod(run, model, response, result) {
    const wrapper = h("div", { class: "method-result" });
    wrapper.append(h("div", { class: "hint compute", text: `${fmtMs(result.compute_ms)} of compute` }));
    for (const target of result.results) wrapper.append(renderTarget(run, model, response, result, target));
    return wrapper;
  }

  // -- one map: overlay, value under the cursor, statistics, evaluation, layer strip, downloads -------------------

  const rawCache = new WeakMap();

  function rawOf(map) {
    if (!map.raw) return null;
    if (!rawCache.has(map)) {
      const bytes = base64Bytes(map.raw.data);
      const view = new DataView(bytes.buffer);
      const values = new Float32Array(bytes.length / 4);
      for (let i = 0; i < values.length; i++) values[i] = view.getFloat32(4 * i, true);
      const [height, width] = map.raw.shape;
      rawCache.set(map, { width, height, values, bytes });
    }
    return rawCache.get(map);
  }

  function npy(raw) {
    const header = `{'descr': '<f4', 'fortran_order': False, 'shape': (${raw.height}, ${raw.width}), }`;
    const total = Math.ceil((10 + header.length + 1) / 64) * 64;
    const padded = `${header}${" ".repeat(total - 10 - header.length - 1)}\n`;
    const preamble = new Uint8Array(10);
    preamble.set([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 1, 0]); // \x93NUMPY, version 1.0
    new DataView(preamble.buffer).setUint16(8, padded.length, true);
    return new Blob([preamble, new TextEncoder().encode(padded), raw.bytes], { type: "application/octet-stream" });
  }

  function mapJson(model, response, result, target, entry) {
    const raw = rawOf(entry.map);
    const values = [];
    if (raw) {
      for (let row = 0; row < raw.height; row++) {
        values.push(Array.from(raw.values.subarray(row * raw.width, (row + 1) * raw.width), (v) => (Number.isNaN(v) ? null : v)));
      }
    }
    const { heatmap_png: _h, overlay_png: _o, gray_png: _g, raw: _r, ...map } = entry.map;
    return JSON.stringify({
      model_id: model.id, method: result.method, params: result.params, target: target.target, layer: entry.layer,
      space: response.space, original_size: response.original_size, crop_box: response.crop_box, ...map,
      evaluation: entry.layer === null ? target.evaluation : null, values, note: "values: the raw map, null where the model saw nothing",
    });
  }

  function gradientClass(map, options) {
    const name = options.output.colormap || (map.sign === "signed" ? "RdBu_r" : "jet");
    return GRADIENTS.has(name) ? `cbar cm-${name}` : "cbar";
  }

  function renderStats(map) {
    const s = map.statistics;
    const items = [
      ["spread (entropy)", fmt(s.entropy), "Entropy of the map as a distribution, over log(cells): 1 is uniform"],
      ["top-10% mass", fmt(s.top10_mass), "Share of the mass held by the top 10% of cells"],
      ["border mass", fmt(s.border_mass), "Share of the mass outside the middle half of each side (uniform: about 0.75)"],
      ["peak", `row ${s.peak.row}, col ${s.peak.col} · (${Math.round(s.peak.x)}, ${Math.round(s.peak.y)}) px`, "The highest cell and its centre in original pixels"],
      ["min … max", `${fmt(s.min)} … ${fmt(s.max)}`, "The map's range on its grid"],
    ];
    if (s.completeness_gap !== null && s.completeness_gap !== undefined) {
      items.push(["completeness gap", fmt(s.completeness_gap), "Integrated gradients: sum of attributions minus the logit difference"]);
    }
    return h("dl", { class: "stats" }, items.map(([name, value, title]) => [h("dt", { text: name, title }), h("dd", { text: value, class: "stat", dataset: { stat: name } })]));
  }

  function renderEvaluation(evaluation) {
    const rows = state.metrics.filter((metric) => evaluation[metric.name] !== null && evaluation[metric.name] !== undefined)
      .map((metric) => h("li", { title: metric.description },
        h("span", { text: metric.name.replace(/_/g, " ") }),
        h("strong", { text: fmt(evaluation[metric.name]) }),
        h("span", { class: "hint", text: metric.higher_is_better ? "↑ better" : "↓ better" })));
    return h("div", { class: "evaluation" }, h("div", { class: "hint", text: `faithfulness, following class ${evaluation.target}` }),
      h("ul", {}, rows));
  }

  function renderSelection(selection) {
    const winner = selection.candidates[selection.winner];
    return h("details", { class: "selection" },
      h("summary", { text: `auto chose ${winner.method} (score ${fmt(winner.score)})` }),
      h("ol", {}, selection.candidates.map((candidate, index) => h("li", { class: index === selection.winner ? "winner" : "" },
        `${candidate.method}: deletion ${fmt(candidate.deletion)}, insertion ${fmt(candidate.insertion)}, score ${fmt(candidate.score)}`))));
  }

  function renderTarget(run, model, response, result, target) {
    const main = { map: target.map, layer: null };
    const layers = (target.layers || []).map((layer) => ({ map: layer, layer: layer.layer }));
    let current = main;

    const caption = h("div", { class: "map-caption" }, target.target
      ? `class ${target.target.label} (#${target.target.index}, ${percent(target.target.probability)})`
      : "class-agnostic");
    const image = h("img", { class: "map-image", draggable: "false", alt: "" });
    const marker = h("span", { class: "peak-marker", title: "peak" });
    const figure = h("div", { class: "map-figure" }, image, marker);
    const readout = h("div", { class: "readout" });
    const colourBar = h("div", { class: "cbar" });
    const low = h("span");
    const high = h("span");
    const scale = h("div", { class: "scale" }, low, colourBar, high);
    const statsBox = h("div", { class: "stats-box" });
    const viewing = h("div", { class: "viewing" });
    const strip = layers.length ? h("div", { class: "layer-strip" }) : null;

    const idle = () => {
      const raw = rawOf(current.map);
      readout.textContent = raw ? "hover the map to read its values" : "no raw values";
    };

    function show(entry) {
      current = entry;
      image.src = `data:image/png;base64,${entry.map.overlay_png}`;
      image.alt = `${result.method} on ${model.id}${entry.layer === null ? "" : `, block ${entry.layer}`}`;
      colourBar.className = gradientClass(entry.map, run.options);
      low.textContent = fmt(entry.map.value_range[0]);
      high.textContent = fmt(entry.map.value_range[1]);
      scale.title = `colour scale (${entry.map.sign}): ${fmt(entry.map.value_range[0])} to ${fmt(entry.map.value_range[1])}`;
      statsBox.replaceChildren(renderStats(entry.map));
      const { peak } = entry.map.statistics;
      const box = response.crop_box;
      const [width, height] = response.original_size;
      const fx = response.space === "original" ? peak.x / width : (peak.x - box.left) / (box.right - box.left);
      const fy = response.space === "original" ? peak.y / height : (peak.y - box.top) / (box.bottom - box.top);
      marker.style.left = `${100 * fx}%`;
      marker.style.top = `${100 * fy}%`;
      viewing.replaceChildren(entry.layer === null ? "" : h("span", {}, `showing block ${entry.layer} · `,
        h("button", { type: "button", class: "link", text: "back to the map", onclick: () => show(main) })));
      for (const thumb of strip?.children || []) thumb.classList.toggle("selected", Number(thumb.dataset.layer) === entry.layer);
      idle();
    }

    figure.addEventListener("mousemove", (event) => {
      const raw = rawOf(current.map);
      if (!raw) return;
      const rect = image.getBoundingClientRect();
      const col = Math.min(raw.width - 1, Math.max(0, Math.floor(((event.clientX - rect.left) / rect.width) * raw.width)));
      const row = Math.min(raw.height - 1, Math.max(0, Math.floor(((event.clientY - rect.top) / rect.height) * raw.height)));
      const value = raw.values[row * raw.width + col];
      readout.textContent = `x ${col}, y ${row}: ${Number.isNaN(value) ? "not seen by the model" : fmt(value)}`;
    });
    figure.addEventListener("mouseleave", idle);

    if (strip) {
      for (const entry of layers) {
        strip.append(h("button", { type: "button", class: "layer-thumb", dataset: { layer: entry.layer },
          title: `block ${entry.layer}: spread (entropy) ${fmt(entry.map.statistics.entropy)}, top-10% mass ${fmt(entry.map.statistics.top10_mass)}`,
          onclick: () => show(current === entry ? main : entry) },
        h("img", { src: `data:image/png;base64,${entry.map.overlay_png}`, alt: `block ${entry.layer}` }),
        h("span", { class: "layer-label", text: `block ${entry.layer}` }),
        h("span", { class: "layer-entropy", text: `H ${fmt(entry.map.statistics.entropy)}` })));
      }
    }

    const base = () => safeName([model.id, result.method, target.target ? `class${target.target.index}` : "agnostic",
      current.layer === null ? "" : `block${current.layer}`].filter(Boolean).join("-"));
    const downloads = h("div", { class: "downloads" }, h("span", { class: "hint", text: "download" }),
      h("button", { type: "button", class: "link", text: "PNG", title: "The overlay as PNG",
        onclick: () => download(new Blob([base64Bytes(current.map.overlay_png)], { type: "image/png" }), `${base()}.png`) }),
      h("button", { type: "button", class: "link", text: ".npy", title: "The raw map (float32, NaN where unseen) for numpy.load",
        onclick: () => { const raw = rawOf(current.map); if (raw) download(npy(raw), `${base()}.npy`); } }),
      h("button", { type: "button", class: "link", text: "JSON", title: "The raw map's values (null where unseen) with its statistics",
        onclick: () => download(new Blob([mapJson(model, response, result, target, current)], { type: "application/json" }), `${base()}.json`) }));

    show(main);
    return h("div", { class: "target" }, caption, figure, readout, scale, viewing, statsBox,
      target.evaluation ? renderEvaluation(target.evaluation) : null,
      target.selection ? renderSelection(target.selection) : null,
      strip ? h("div", { class: "strip-box" }, h("div", { class: "hint", text: "per block · spread (entropy); click one to show it" }), strip) : null,
      downloads);
  }

  // -- start ------------------------------------------------------------------------------------------------------

  document.addEventListener("DOMContentLoaded", () => {
    setupAuth();
    setupOptions();
    setupImage();
    $("controls").addEventListener("submit", start);
    $("cancel").addEventListener("click", () => state.run?.controller?.abort());
    loadSample(DEFAULT_SAMPLE);
    loadCatalogue();
  });
})();
