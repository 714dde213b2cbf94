// Bastion's only script besides htmx: copy buttons and moving focus to what just changed. Loaded from /static,
// so the Content-Security-Policy can refuse inline script.
(function () {
  "use strict";

  function copy(button) {
    var target = document.getElementById(button.getAttribute("data-copy"));
    if (!target) { return; }
    var text = target.value !== undefined ? target.value : target.textContent;
    var status = document.querySelector('[data-copied-for="' + button.getAttribute("data-copy") + '"]');
    function done(message) {
      if (status) { status.textContent = message; }
      button.textContent = message === "Copied." ? "Copied" : "Copy";
    }
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(function () { done("Copied."); }, function () { select(target); done("Press Ctrl+C (or ⌘C) to copy."); });
    } else {
      select(target);
      done(document.execCommand && document.execCommand("copy") ? "Copied." : "Press Ctrl+C (or ⌘C) to copy.");
    }
  }

  function select(target) {
    if (target.select) { target.focus(); target.select(); return; }
    var range = document.createRange();
    range.selectNodeContents(target);
    var selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
  }

  function focusChanged(root) {
    var wanted = (root || document).querySelector("[data-autofocus]");
    if (wanted) { wanted.focus(); }
  }

  document.addEventListener("click", function (event) {
    var button = event.target.closest ? event.target.closest("[data-copy]") : null;
    if (button) { event.preventDefault(); copy(button); }
  });
  document.addEventListener("DOMContentLoaded", function () { focusChanged(document); });
  document.addEventListener("htmx:afterSettle", function (event) { focusChanged(event.detail.elt); });
})();
