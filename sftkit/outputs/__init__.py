"""What a run leaves for people to look at and use: loss curves (``plot``), sample answers (``samples``), the
end-of-run summary (``summary``), talking to the model (``chat``), a LoRA adapter merged into its base (``merge``),
and the trackers that report a run (``trackers``). ``generation`` answers conversations for samples and chat;
``trained`` opens a trained directory.
"""
