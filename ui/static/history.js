// The verdict history: a search over the dashboard's SQLite record, paged newest first, exported as CSV.
"use strict";

(() => {
  const { el, datetime, number, api, toast, root } = LG;
  const form = document.getElementById("search");
  const rows = document.getElementById("rows");
  const older = document.getElementById("older");
  const csv = document.getElementById("csv");
  let next = 0;

  const localInput = (date) => new Date(date.getTime() - date.getTimezoneOffset() * 60000).toISOString().slice(0, 19);
  const seconds = (value) => new Date(value).getTime() / 1000;

  function query(before = 0) {
    const data = new FormData(form);
    const params = new URLSearchParams();
    params.set("start", seconds(data.get("start")));
    params.set("end", seconds(data.get("end")));
    for (const name of ["line", "agent", "camera", "verdict", "model"]) {
      const value = String(data.get(name) || "").trim();
      if (value) params.set(name, value);
    }
    if (before) params.set("before", before);
    return params;
  }

  async function search(append) {
    const params = query(append ? next : 0);
    csv.href = `${root}/api/history.csv?${query(0)}`;
    try {
      const page = await api(`/api/history?${params}`);
      if (!append) rows.replaceChildren();
      for (const v of page.rows) {
        rows.append(el("tr", { "data-seq": v.seq },
          el("td", { text: datetime(v.decided_ts) }), el("td", { text: v.line }), el("td", { text: v.agent_id }),
          el("td", { text: v.camera }), el("td", { class: "num", text: v.seq }),
          el("td", { class: `v-${v.verdict}`, text: v.verdict === "failsafe" ? `failsafe (${v.cause})` : v.verdict }),
          el("td", { class: "num", text: number(v.score, 4) }), el("td", { class: "num", text: number(v.threshold, 4) }),
          el("td", { text: v.model }), el("td", { class: "num", text: number(v.latency_ms.total, 1) }),
          el("td", { text: v.reason })));
      }
      next = page.next;
      older.hidden = !next;
      document.getElementById("summary").textContent =
        `${page.total} verdict(s) match; showing ${rows.children.length}, newest first.`;
    } catch (error) {
      toast(`Search failed: ${error.message}`, true);
    }
  }

  const now = new Date();
  form.elements.start.value = localInput(new Date(now.getTime() - 3600 * 1000));
  form.elements.end.value = localInput(new Date(now.getTime() + 60 * 1000));
  form.addEventListener("submit", (event) => { event.preventDefault(); search(false); });
  older.addEventListener("click", () => search(true));
  search(false);
})();
