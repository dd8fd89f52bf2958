// The model panel: what each agent serves and every push or rollback with its canary/shadow result.
"use strict";

(() => {
  const { el, datetime, ago, number, api, toast } = LG;
  const line = LG.body.line || "+";

  async function load() {
    try {
      const [snapshot, pushes] = await Promise.all([api(`/api/line/${encodeURIComponent(line)}/snapshot`), api("/api/pushes")]);
      const broker = document.getElementById("commands").dataset.broker;
      document.getElementById("serving").replaceChildren(...snapshot.agents.map((card) => el("div", { class: "panel agent-card", "data-agent": card.agent_id },
        el("header", {}, el("strong", { text: card.agent_id }), el("span", { class: card.online ? "pill ok" : "pill bad", text: card.online ? "online" : "offline" })),
        el("dl", { class: "model" },
          el("dt", { text: "serving" }), el("dd", { text: card.model || "–" }),
          el("dt", { text: "back end" }), el("dd", { text: card.backend || "–", title: card.backend_detail }),
          el("dt", { text: "threshold" }), el("dd", { text: number(card.threshold, 4) }),
          el("dt", { text: "live since" }), el("dd", { text: card.live_since ? `${datetime(card.live_since)} (${ago(card.live_since)})` : "–" })),
        el("pre", { class: "commands", text: `lineguard-deploy ${broker} push BUNDLE --agent ${card.agent_id}\nlineguard-deploy ${broker} rollback --agent ${card.agent_id}` }))));
      document.getElementById("push-rows").replaceChildren(...pushes.map((event) => el("tr", { "data-request": event.request_id },
        el("td", { text: datetime(event.ts) }), el("td", { text: event.agent_id }), el("td", { text: event.action }),
        el("td", { class: event.outcome === "accepted" ? "v-accept" : "v-reject", text: event.outcome }),
        el("td", { text: event.model || "(previous)" }), el("td", { text: event.serving || "–" }),
        el("td", { class: "num", text: event.shadow ? event.shadow.frames : "–" }),
        el("td", { text: event.shadow ? `${number(event.shadow.serving_reject_rate * 100, 2)}% → ${number(event.shadow.candidate_reject_rate * 100, 2)}%` : "canary only" }),
        el("td", { text: event.reason }))));
    } catch (error) {
      toast(`Could not load models: ${error.message}`, true);
    }
  }

  load();
  setInterval(load, 10000);
})();
