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

  // A form marked data-submit-once is sent once: a double click on "Approve" is one approval. Its buttons are
  // disabled while it goes; coming back to the page (the back button) makes them usable again.
  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (!form || !form.hasAttribute || !form.hasAttribute("data-submit-once")) { return; }
    if (form.getAttribute("data-submitting") === "true") { event.preventDefault(); return; }
    form.setAttribute("data-submitting", "true");
    var buttons = form.querySelectorAll("button, input[type=submit]");
    for (var i = 0; i < buttons.length; i++) {
      buttons[i].disabled = true;
      buttons[i].setAttribute("aria-disabled", "true");
      if (buttons[i].hasAttribute("data-busy-text")) { buttons[i].textContent = buttons[i].getAttribute("data-busy-text"); }
    }
  });
  window.addEventListener("pageshow", function (event) {
    if (!event.persisted) { return; }
    var sent = document.querySelectorAll("form[data-submitting]");
    for (var i = 0; i < sent.length; i++) {
      sent[i].removeAttribute("data-submitting");
      var buttons = sent[i].querySelectorAll("button, input[type=submit]");
      for (var j = 0; j < buttons.length; j++) {
        buttons[j].disabled = false;
        buttons[j].removeAttribute("aria-disabled");
        if (buttons[j].hasAttribute("data-idle-text")) { buttons[j].textContent = buttons[j].getAttribute("data-idle-text"); }
      }
    }
  });

  document.addEventListener("click", function (event) {
    var button = event.target.closest ? event.target.closest("[data-copy]") : null;
    if (button) { event.preventDefault(); copy(button); }
  });
  document.addEventListener("DOMContentLoaded", function () { focusChanged(document); });
  document.addEventListener("htmx:afterSettle", function (event) { focusChanged(event.detail.elt); });
})();
