"""The sample store: frames the agent decided on, kept on disk, labelled by engineers, exported for the trainer.

policy.py    which verdicts become samples (pure: rejects, failsafes, close calls, a pseudo-random share of accepts)
files.py     what one sample folder holds (sample.json, view.png, map.npy, label.json) and reading it back
ratelimit.py a per-minute budget (samples per camera, answers to refused labels)
store.py     the on-disk layout under <state_dir>/samples, per-class budgets, oldest-first eviction, atomic writes
writer.py    the decision process's side: a bounded queue and one writer thread that stores and announces
labels.py    signed SampleLabels from MQTT -> label.json beside the sample -> SampleLabelResult (rollout process)
export.py    labelled samples -> an MVTec-style folder or a CSV manifest the trainer reads, with a README
cli.py       `lineguard-agent samples list|label|export`
"""
