"""What the UI tabs share: display helpers (digits images enlarged for the screen, inline
<img> tags) and the app's CSS. Both tab packages import it; it imports neither."""
