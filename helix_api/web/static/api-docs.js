// Renders the OpenAPI document named by #api-docs[data-spec]: one section per operation, with its
// parameters and the schema of its body. Plain DOM, so the page needs nothing from another site.
"use strict";

(function () {
  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    Object.entries(attrs || {}).forEach(([k, v]) => node.setAttribute(k, v));
    (children || []).forEach((c) => node.append(c instanceof Node ? c : document.createTextNode(String(c))));
    return node;
  }

  function resolve(spec, schema) {
    if (schema && schema.$ref) {
      return spec.components.schemas[schema.$ref.split("/").pop()] || {};
    }
    return schema || {};
  }

  function typeOf(spec, schema, depth) {
    schema = schema || {};
    if (schema.$ref) return schema.$ref.split("/").pop();
    if (schema.anyOf) return schema.anyOf.map((s) => typeOf(spec, s, depth)).join(" | ");
    if (schema.const !== undefined) return JSON.stringify(schema.const);
    if (schema.enum) return schema.enum.map((v) => JSON.stringify(v)).join(" | ");
    if (schema.type === "array") return typeOf(spec, schema.items, depth) + "[]";
    const limits = [];
    ["minimum", "exclusiveMinimum", "maximum", "maxLength", "maxItems"].forEach((k) => {
      if (schema[k] !== undefined) limits.push(k + " " + schema[k]);
    });
    return (schema.type || "any") + (limits.length ? " (" + limits.join(", ") + ")" : "");
  }

  function fields(spec, schema, seen) {
    schema = resolve(spec, schema);
    const required = new Set(schema.required || []);
    const rows = Object.entries(schema.properties || {}).map(([name, prop]) => el("tr", {}, [
      el("td", {}, [el("code", {}, [name]), required.has(name) ? " *" : ""]),
      el("td", {}, [typeOf(spec, prop)]),
      el("td", {}, [prop.description || ""]),
    ]));
    const table = el("table", { class: "schema" }, [el("tbody", {}, rows)]);
    const nested = [];
    Object.values(schema.properties || {}).forEach((prop) => {
      const text = JSON.stringify(prop);
      (text.match(/#\/components\/schemas\/\w+/g) || []).forEach((ref) => {
        const name = ref.split("/").pop();
        if (!seen.has(name)) {
          seen.add(name);
          nested.push(el("h4", {}, [name]), fields(spec, { $ref: ref }, seen));
        }
      });
    });
    return el("div", {}, [table, ...nested]);
  }

  function operation(spec, path, method, op) {
    const parts = [el("h3", { id: op.operationId }, [el("code", {}, [method.toUpperCase() + " " + path])]),
                   el("p", {}, [op.summary || ""])];
    if ((op.parameters || []).length) {
      parts.push(el("table", { class: "schema" }, [el("tbody", {}, op.parameters.map((p) => el("tr", {}, [
        el("td", {}, [el("code", {}, [p.name]), p.required ? " *" : ""]),
        el("td", {}, [p.in + ", " + typeOf(spec, p.schema)]),
        el("td", {}, [p.description || ""]),
      ])))]));
    }
    const body = op.requestBody && op.requestBody.content;
    Object.entries(body || {}).forEach(([type, media]) => {
      parts.push(el("h4", {}, ["Body: " + type]), fields(spec, media.schema, new Set()));
    });
    return el("section", { class: "operation" }, parts);
  }

  function render(root, spec) {
    root.replaceChildren();
    const byTag = {};
    Object.entries(spec.paths).forEach(([path, methods]) => {
      Object.entries(methods).forEach(([method, op]) => {
        const tag = (op.tags || ["other"])[0];
        (byTag[tag] = byTag[tag] || []).push(operation(spec, path, method, op));
      });
    });
    Object.entries(byTag).forEach(([tag, sections]) => root.append(el("h2", {}, [tag]), ...sections));
    const params = Object.keys(spec.components.schemas).filter((n) => n.startsWith("Params"));
    root.append(el("h2", {}, ["params"]));
    params.forEach((name) => root.append(el("h3", { id: name }, [name]),
                                         fields(spec, { $ref: "#/components/schemas/" + name }, new Set())));
  }

  document.addEventListener("DOMContentLoaded", () => {
    const root = document.getElementById("api-docs");
    if (!root) return;
    fetch(root.dataset.spec).then((r) => r.json()).then((spec) => render(root, spec))
      .catch((err) => { root.textContent = "Could not load the API document: " + err; });
  });
})();
