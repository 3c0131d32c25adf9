"""Support code for the Gradio app: settings, the shared model service and the compare grid.
The UI packages (``train_tab``, ``compare_tab``) call it; it holds no Gradio components."""
