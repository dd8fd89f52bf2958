// The alarm log: every alarm with when it was raised, when its condition ended and who acknowledged it.
"use strict";

(() => {
  const { el, datetime, api, toast } = LG;

  async function load() {
    try {
      const alarms = await api("/api/alarms?history=true&limit=500");
      document.getElementById("alarm-rows").replaceChildren(...alarms.map((a) => el("tr", { "data-alarm": a.alarm_id },
        el("td", { text: datetime(a.raised_ts) }), el("td", { text: a.kind }), el("td", { text: a.line }),
        el("td", { text: a.camera ? `${a.subject}/${a.camera}` : a.subject }), el("td", { text: a.message }),
        el("td", { class: "num", text: a.count }),
        el("td", { text: a.active ? "still active" : datetime(a.cleared_ts) }),
        el("td", { text: a.acked_ts ? `${a.acked_by}, ${datetime(a.acked_ts)}` : "not yet" }))));
    } catch (error) {
      toast(`Could not load alarms: ${error.message}`, true);
    }
  }

  load();
  setInterval(load, 10000);
})();
