// The radiograph page: level and width sliders that load the image through a
// new window (rendered by the server: <data-image>?level=L&width=W), a reset to
// the whole range, and the heat map of the finding chosen in the list laid over
// the image (<data-heatmap>?finding=NAME). No library, no inline code; without
// script the form still works (it reloads the page with the window).
(function () {
  "use strict";

  var SETTLE_MS = 120;  // while a slider moves, load the image once it rests this long

  function setUp(root) {
    var imageBase = root.getAttribute("data-image");
    var heatBase = root.getAttribute("data-heatmap");
    var image = root.querySelector(".radiograph-image");
    var form = root.querySelector(".window-controls");
    var level = root.querySelector(".window-level");
    var width = root.querySelector(".window-width");
    if (!imageBase || !image || !form || !level || !width) {
      return;
    }
    var outputs = form.querySelectorAll(".window-value");
    var reset = form.querySelector(".window-reset");
    var overlay = root.querySelector(".heatmap-overlay");
    var heatSwitch = root.querySelector(".heatmap-switch");
    var heatName = root.querySelector(".heatmap-finding");
    var missing = root.querySelector(".heatmap-missing");
    var buttons = document.querySelectorAll("[data-finding]");
    var defaults = [root.getAttribute("data-default-level"), root.getAttribute("data-default-width")];
    var query = new URLSearchParams(window.location.search);
    var whole = !query.get("level");  // the whole range until a slider moves
    var timer = null;
    var chosen = buttons.length ? buttons[0] : null;  // the most probable finding first

    function windowQuery() {
      return whole ? "" : "?level=" + encodeURIComponent(level.value) + "&width=" + encodeURIComponent(width.value);
    }

    function showValues() {
      outputs[0].textContent = level.value;
      outputs[1].textContent = width.value;
    }

    function load() {
      if (timer !== null) {
        window.clearTimeout(timer);
        timer = null;
      }
      var next = imageBase + windowQuery();
      if (image.getAttribute("src") !== next) {
        image.src = next;
        image.alt = image.alt.replace(/, (whole range|window .*)$/,
          whole ? ", whole range" : ", window level " + level.value + ", width " + width.value);
      }
      if (window.history && window.history.replaceState) {
        window.history.replaceState(null, "", window.location.pathname + windowQuery());
      }
    }

    function moved() {
      whole = false;
      showValues();
      if (timer !== null) {
        window.clearTimeout(timer);
      }
      timer = window.setTimeout(load, SETTLE_MS);
    }

    function showHeat() {
      if (!overlay || !heatSwitch) {
        return;
      }
      for (var b = 0; b < buttons.length; b += 1) {
        buttons[b].setAttribute("aria-pressed", String(heatSwitch.checked && buttons[b] === chosen));
      }
      if (missing) {
        missing.hidden = true;
      }
      if (heatSwitch.checked && chosen) {
        overlay.src = heatBase + "?finding=" + encodeURIComponent(chosen.getAttribute("data-finding"));
        overlay.hidden = false;
      } else {
        overlay.hidden = true;
        overlay.removeAttribute("src");
      }
    }

    level.addEventListener("input", moved);
    width.addEventListener("input", moved);
    level.addEventListener("change", function () { whole = false; showValues(); load(); });
    width.addEventListener("change", function () { whole = false; showValues(); load(); });
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      whole = false;
      showValues();
      load();
    });
    if (reset) {
      reset.addEventListener("click", function (event) {
        event.preventDefault();
        level.value = defaults[0];
        width.value = defaults[1];
        whole = true;
        showValues();
        load();
      });
    }
    if (heatSwitch) {
      heatSwitch.addEventListener("change", showHeat);
    }
    if (overlay) {
      overlay.addEventListener("error", function () {
        if (overlay.getAttribute("src")) {
          overlay.hidden = true;
          if (missing) {
            missing.hidden = false;
          }
        }
      });
    }
    for (var i = 0; i < buttons.length; i += 1) {
      buttons[i].addEventListener("click", function (event) {
        chosen = event.currentTarget;
        if (heatName) {
          heatName.textContent = chosen.textContent;
        }
        if (heatSwitch) {
          heatSwitch.checked = true;
        }
        showHeat();
      });
    }
    root.classList.add("ready");
  }

  var viewers = document.querySelectorAll("[data-radiograph]");
  for (var v = 0; v < viewers.length; v += 1) {
    setUp(viewers[v]);
  }
}());
