"""The FiftyOne App: operators and their forms, progress streamed to the App, the grounding panel,
the zoo source and the loaded-model cache, and installing the plugin. Thin: each action is one
library call."""
